"""Where the lab keeps its files: the state folder's layout and its modes.

Everything lives in the state folder (``TWOPC_HOME``, default ``./.twopc``)::

    lab.json                 ports chosen at the first ``up``
    credentials.json         the broker's user and password, the keystore password, and
                             the PostgreSQL passwords (twopc, twopc_batch_reader, and
                             the lab's own superuser twopc_admin) (0600)
    pgpass                   libpq password file for twopc and twopc_batch_reader (0600);
                             the lab's connection strings name it (``passfile=``) and
                             ``twopc lab env`` exports it as ``PGPASSFILE``
    pg-a/data, pg-b/data     the clusters (owned by an unprivileged user when run as root)
    pg-a/server.log, ...     their logs
    activemq/conf            broker configuration (STOMP, STOMP+TLS and OpenWire, each
                             requiring the login; KahaDB with journal syncs)
    activemq/broker.p12      the broker's key and self-signed certificate (keytool)
    activemq/broker-cert.pem that certificate, for clients to trust (TWOPC_STOMP_CA)
    activemq/data            broker persistence
    run/<service>.json       pid and process start time of what ``up`` started

The state folder is 0700, the activemq folder too, and credentials.json 0600.
When twopc runs as root, PostgreSQL and the broker run as ``twopc-lab`` and must
traverse the state folder to reach their files: the folder is then 0710 with
group ``twopc-lab`` -- that user may pass through it, nobody else may even do
that, and only root reads or lists it. The clusters' folders and the activemq
folder belong to ``twopc-lab``; credentials.json and pgpass stay root's.
"""

from __future__ import annotations

PASSFILE = "pgpass"
HOME_MODE = 0o700  # the state folder; 0710 with group twopc-lab when run as root
CREDENTIALS_FILE = "credentials.json"
BROKER_XML = "activemq/conf/activemq.xml"  # the broker's configuration, in the state folder
KEYSTORE = "activemq/broker.p12"
CERTIFICATE = "activemq/broker-cert.pem"
