"""estkit: EST (RFC 7030 / RFC 8951) certificates for IoT devices.

Parts (imports point downward only): ``pki`` (pure X.509 and EST wire
formats), ``store``, ``ca``, ``server``, ``client``, ``agent``, ``cli``.
"""

__version__ = "0.1.0"
