"""The configuration files the lab writes: the broker's activemq.xml and log4j.properties,
and the lines it adds to each cluster's postgresql.conf.
"""

from __future__ import annotations

#: The queues under this prefix have producer flow control on and a small memory limit
#: (the rest of the lab's queues have it off): where scenarios.flow_control shows a slow
#: consumer holding up its producers.
FLOW_LIMITED_PREFIX = "flow.limited."
#: The memory limit of each flow-limited queue: its pending messages held in memory.
FLOW_LIMITED_MEMORY = "64 kb"
#: The memory limit of every other queue: the part of its pending messages it caches in
#: the heap (-Xmx512m); the rest wait in the store.
QUEUE_MEMORY = "32 mb"
#: The tests' queues: each test, or each example of a property-based test, names its own
#: under this prefix, and a test session on a lab that outlives it empties them at its end
#: (tests/conftest.py). The lab's broker removes such a queue once it has held no message
#: and had no consumer for TEST_QUEUE_IDLE_MS: a lab that serves many runs does not pile
#: them up in its heap. No other queue is removed (an event topic's consumer queue must
#: outlive a quiet spell, or the events sent meanwhile go nowhere).
TEST_QUEUE_PREFIX = "test."
TEST_QUEUE_IDLE_MS = 300_000
#: How often the broker looks for such queues to remove.
QUEUE_PURGE_PERIOD_MS = 60_000

ACTIVEMQ_XML = (
    """<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans
    http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
    http://activemq.apache.org/schema/core
    http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="twopc-lab"
          useJmx="false" persistent="true" dataDirectory="{data}"
          schedulePeriodForDestinationPurge="{purge_period}">
    <destinationPolicy>
      <policyMap><policyEntries>
        <!-- a browse returns at most maxBrowsePageSize messages (default 400).
             memoryLimit: each queue caches at most this much of its pending messages in
             the heap; the rest stay in the store and are paged in as consumers take
             them. Without it the cache has no bound (the broker's own memory limit is
             unset, so that no queue's backlog can stop another from paging in), and a
             backlog of a few hundred thousand messages ends the broker with
             OutOfMemoryError. -->
        <policyEntry queue=">" producerFlowControl="false" maxBrowsePageSize="1000000"
                     memoryLimit="{queue_memory}"/>
        <!-- the push model's danger, shown on these queues alone (scenarios.flow_control):
             producer flow control on and a small memory limit, every pending message
             held in memory (vmQueueCursor), so a slow consumer blocks the producers'
             sends. ActiveMQ applies the matching entry whose name sorts last: this one. -->
        <policyEntry queue="{flow_prefix}>" producerFlowControl="true" memoryLimit="{flow_memory}"
                     maxBrowsePageSize="1000000">
          <pendingQueuePolicy><vmQueueCursor/></pendingQueuePolicy>
        </policyEntry>
        <!-- the tests' queues: as queue=">" does, and each is removed once empty and
             unused for inactiveTimeoutBeforeGC ms (a send, a consumer or a message
             keeps it) -->
        <policyEntry queue="{test_prefix}>" producerFlowControl="false"
                     maxBrowsePageSize="1000000" memoryLimit="{queue_memory}"
                     gcInactiveDestinations="true" inactiveTimeoutBeforeGC="{test_idle}"/>
      </policyEntries></policyMap>
    </destinationPolicy>
    <persistenceAdapter>
      <!-- journalDiskSyncStrategy="always": a COMMIT receipt means the journal is on disk -->
      <kahaDB directory="{data}/kahadb" journalDiskSyncStrategy="always"/>
    </persistenceAdapter>
    <systemUsage><systemUsage>
      <storeUsage><storeUsage limit="4 gb"/></storeUsage>
      <tempUsage><tempUsage limit="1 gb"/></tempUsage>
    </systemUsage></systemUsage>
    <plugins>
      <!-- every connector, OpenWire included, and the broker's own vm:// connections
           need this login: there is no anonymous access -->
      <simpleAuthenticationPlugin anonymousAccessAllowed="false">
        <users>
          <authenticationUser username="{user}" password="{password}" groups="users,admins"/>
        </users>
      </simpleAuthenticationPlugin>
    </plugins>
    <sslContext>
      <sslContext keyStore="{keystore}" keyStorePassword="{keystore_password}"
                  keyStoreType="PKCS12"/>
    </sslContext>
    <transportConnectors>
      <transportConnector name="openwire" uri="tcp://127.0.0.1:{openwire}"/>
      <!-- transport.tcpNoDelay=true: without it the broker's small frames (a RECEIPT, then
           the next MESSAGE) wait for the client's delayed ACK, about 40 ms each -->
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{stomp}?transport.tcpNoDelay=true"/>
      <transportConnector name="stomp+ssl"
                          uri="stomp+ssl://127.0.0.1:{stomp_tls}?transport.tcpNoDelay=true"/>
    </transportConnectors>
  </broker>
</beans>
""".replace("{flow_prefix}", FLOW_LIMITED_PREFIX)
    .replace("{flow_memory}", FLOW_LIMITED_MEMORY)
    .replace("{queue_memory}", QUEUE_MEMORY)
    .replace("{test_prefix}", TEST_QUEUE_PREFIX)
    .replace("{test_idle}", str(TEST_QUEUE_IDLE_MS))
    .replace("{purge_period}", str(QUEUE_PURGE_PERIOD_MS))
)

LOG4J_PROPERTIES = """log4j.rootLogger=INFO, file
log4j.logger.org.apache.activemq.spring=WARN
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log}
log4j.appender.file.MaxFileSize=10MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=%d %-5p [%t] %c - %m%n
"""

PG_CONF = """
# twopc lab settings
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
max_connections = 200
max_prepared_transactions = 200
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 128MB
logging_collector = off
log_min_messages = warning
"""
