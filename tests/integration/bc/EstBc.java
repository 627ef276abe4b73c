// Bouncy Castle's EST client (org.bouncycastle.est, bcpkix) as a command, for the interop test.
//
//   EstBc cacerts      HOST:PORT ROOT.pem OUTDIR [--label LABEL]
//   EstBc enroll       HOST:PORT ROOT.pem OUTDIR DEVICE-ID [--label LABEL] [--basic USER PASSWORD] [--tls KEY.pem CERT.pem]
//   EstBc reenroll     (as enroll)
//   EstBc serverkeygen (as enroll)
//
// ROOT.pem is the only trust anchor. cacerts writes OUTDIR/cacerts.pem; the enroll
// operations write OUTDIR/cert.pem (every certificate of the response, in its order)
// and OUTDIR/key.pem (PKCS#8: the key this program made for the CSR, or for
// serverkeygen the key the server returned). Results go to stdout as "name: value"
// lines; on failure the HTTP status and the exception chain go to stderr, exit status 1.

import java.io.FileReader;
import java.io.FileWriter;
import java.io.IOException;
import java.io.Reader;
import java.io.Writer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Security;
import java.security.cert.TrustAnchor;
import java.security.cert.X509Certificate;
import java.security.spec.ECGenParameterSpec;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

import javax.net.ssl.KeyManagerFactory;

import org.bouncycastle.asn1.pkcs.PrivateKeyInfo;
import org.bouncycastle.asn1.x500.X500Name;
import org.bouncycastle.cert.X509CertificateHolder;
import org.bouncycastle.cert.jcajce.JcaX509CertificateConverter;
import org.bouncycastle.est.CACertsResponse;
import org.bouncycastle.est.ESTAuth;
import org.bouncycastle.est.ESTException;
import org.bouncycastle.est.ESTService;
import org.bouncycastle.est.EnrollmentResponse;
import org.bouncycastle.est.jcajce.JcaHttpAuthBuilder;
import org.bouncycastle.est.jcajce.JcaJceUtils;
import org.bouncycastle.est.jcajce.JsseDefaultHostnameAuthorizer;
import org.bouncycastle.est.jcajce.JsseESTServiceBuilder;
import org.bouncycastle.jce.provider.BouncyCastleProvider;
import org.bouncycastle.openssl.PEMKeyPair;
import org.bouncycastle.openssl.PEMParser;
import org.bouncycastle.openssl.jcajce.JcaPEMKeyConverter;
import org.bouncycastle.openssl.jcajce.JcaPEMWriter;
import org.bouncycastle.pkcs.PKCS10CertificationRequest;
import org.bouncycastle.pkcs.jcajce.JcaPKCS10CertificationRequestBuilder;
import org.bouncycastle.operator.jcajce.JcaContentSignerBuilder;
import org.bouncycastle.util.io.pem.PemObject;

public final class EstBc
{
    public static void main(String[] args)
    {
        try
        {
            run(args);
        }
        catch (Throwable t)
        {
            if (t instanceof ESTException)
            {
                System.err.println("HTTP status: " + ((ESTException)t).getStatusCode());
            }
            t.printStackTrace();
            System.exit(1);
        }
    }

    private static void run(String[] args) throws Exception
    {
        // JcaJceUtils' certification-path trust manager looks its CertStore up in the "BC" provider.
        Security.addProvider(new BouncyCastleProvider());
        String op = args[0];
        Path out = Paths.get(args[3]);
        Files.createDirectories(out);
        JsseESTServiceBuilder builder = new JsseESTServiceBuilder(args[1],
            JcaJceUtils.getCertPathTrustManager(
                Collections.singleton(new TrustAnchor(readCerts(args[2]).get(0), null)), null));
        builder.withHostNameAuthorizer(new JsseDefaultHostnameAuthorizer(Collections.<String>emptySet()));
        builder.withTimeout(20000);

        boolean enrolls = !op.equals("cacerts");
        String deviceId = enrolls ? args[4] : null;
        ESTAuth auth = null;
        for (int i = enrolls ? 5 : 4; i < args.length; i++)
        {
            if (args[i].equals("--label"))
            {
                builder.withLabel(args[++i]);
            }
            else if (args[i].equals("--basic"))
            {
                // JcaHttpAuthBuilder without a realm: Basic, sent only in answer to a 401 challenge.
                auth = new JcaHttpAuthBuilder(args[i + 1], args[i + 2].toCharArray()).build();
                i += 2;
            }
            else if (args[i].equals("--tls"))
            {
                builder.withKeyManagers(keyManagers(args[i + 1], args[i + 2]));
                i += 2;
            }
            else
            {
                throw new IllegalArgumentException("unknown option " + args[i]);
            }
        }

        if (!enrolls)
        {
            CACertsResponse response = builder.build().getCACerts();
            X509CertificateHolder[] certs = ESTService.storeToArray(response.getCertificateStore());
            writePem(out.resolve("cacerts.pem"), (Object[])certs);
            System.out.println("certificates: " + certs.length);
            System.out.println("trusted: " + response.isTrusted());
            return;
        }

        KeyPairGenerator generator = KeyPairGenerator.getInstance("EC");
        generator.initialize(new ECGenParameterSpec("secp256r1"));
        KeyPair csrKey = generator.generateKeyPair();
        PKCS10CertificationRequest csr = new JcaPKCS10CertificationRequestBuilder(
            new X500Name("CN=" + deviceId), csrKey.getPublic())
            .build(new JcaContentSignerBuilder("SHA256withECDSA").build(csrKey.getPrivate()));

        ESTService est = builder.build();
        EnrollmentResponse response;
        if (op.equals("enroll") || op.equals("reenroll"))
        {
            response = est.simpleEnroll(op.equals("reenroll"), csr, auth);
        }
        else if (op.equals("serverkeygen"))
        {
            response = est.simpleEnrollWithServersideCreation(csr, auth);
        }
        else
        {
            throw new IllegalArgumentException("unknown operation " + op);
        }
        if (!response.isCompleted())
        {
            throw new IllegalStateException("not completed: retry after " + response.getNotBefore());
        }

        X509CertificateHolder[] certs = ESTService.storeToArray(response.getStore());
        writePem(out.resolve("cert.pem"), (Object[])certs);
        System.out.println("certificates: " + certs.length);
        System.out.println("subject: " + certs[0].getSubject());
        PrivateKeyInfo serverKey = response.getPrivateKeyInfo();
        if (op.equals("serverkeygen"))
        {
            if (serverKey == null)
            {
                throw new IllegalStateException("serverkeygen response carried no private key");
            }
            writePem(out.resolve("key.pem"), new PemObject("PRIVATE KEY", serverKey.getEncoded()));
            System.out.println("key-algorithm: " + serverKey.getPrivateKeyAlgorithm().getAlgorithm().getId());
        }
        else
        {
            writePem(out.resolve("key.pem"), new PemObject("PRIVATE KEY", csrKey.getPrivate().getEncoded()));
        }
    }

    /** The key and certificate chain in PEM files, as JSSE key managers for TLS client authentication. */
    private static javax.net.ssl.KeyManager[] keyManagers(String keyPath, String certPath) throws Exception
    {
        PrivateKey key;
        try (Reader r = new FileReader(keyPath); PEMParser parser = new PEMParser(r))
        {
            Object o = parser.readObject();
            JcaPEMKeyConverter converter = new JcaPEMKeyConverter();
            key = converter.getPrivateKey(
                o instanceof PEMKeyPair ? ((PEMKeyPair)o).getPrivateKeyInfo() : PrivateKeyInfo.getInstance(o));
        }
        char[] password = "transient".toCharArray();
        KeyStore store = KeyStore.getInstance("PKCS12");
        store.load(null, null);
        store.setKeyEntry("device", key, password, readCerts(certPath).toArray(new X509Certificate[0]));
        KeyManagerFactory factory = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        factory.init(store, password);
        return factory.getKeyManagers();
    }

    private static List<X509Certificate> readCerts(String path) throws IOException, java.security.cert.CertificateException
    {
        List<X509Certificate> certs = new ArrayList<X509Certificate>();
        JcaX509CertificateConverter converter = new JcaX509CertificateConverter();
        try (Reader r = new FileReader(path); PEMParser parser = new PEMParser(r))
        {
            for (Object o = parser.readObject(); o != null; o = parser.readObject())
            {
                certs.add(converter.getCertificate((X509CertificateHolder)o));
            }
        }
        return certs;
    }

    private static void writePem(Path path, Object... objects) throws IOException
    {
        try (Writer w = new FileWriter(path.toFile()); JcaPEMWriter pem = new JcaPEMWriter(w))
        {
            for (Object o : objects)
            {
                pem.writeObject(o);
            }
        }
    }
}
