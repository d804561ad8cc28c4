"""Two fixes to kombu's Redis transport (kombu 5.7, Celery 5.7) without which a worker
does not outlive its broker going away under load (issue 15). Both are exercised by
tests/test_roles.py, which stops a Redis of its own under a working worker.

1. A failed acknowledgement kept the message counted as in hand. A task that finished
   while Redis was down could not be acknowledged ("Couldn't ack … ConnectionError"),
   yet stayed in the channel's delivered set; once the prefetch limit was full of such
   messages the consumer stopped asking Redis for more, so it never noticed that its
   connection was dead, and never reconnected: a live worker that processes nothing.
   Now the message is forgotten locally even when Redis cannot be told; Redis keeps it
   in its unacked set, to be delivered again after the visibility timeout (tasks are
   idempotent: a stored batch is "already done"), and the sweeper re-sends pending
   batches anyway.
2. The consumer, on losing the broker, first collects the connection (its transport's
   `client` becomes None) and then closes it; closing the default channel restores the
   messages taken but not acknowledged through a client built from that `client`, and
   the AttributeError ("'NoneType' object has no attribute 'hostname'") killed the
   worker ("Unrecoverable error"). Now it raises the connection error the same restore
   raises while the broker is down, which kombu ignores.
"""

from __future__ import annotations


def survive_broker_loss() -> None:
    try:
        from kombu.transport import redis as kombu_redis
        from kombu.transport import virtual
    except ImportError:  # no redis package: no Redis transport to fix
        return
    qos = kombu_redis.QoS
    if kombu_redis.redis is None or getattr(qos, "_runlens_survives_broker_loss", False):
        return
    restore_unacked = qos.restore_unacked

    def ack(self, delivery_tag):
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)
            else:
                self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def restore_unless_released(self, client=None):
        transport = getattr(self.channel, "connection", None)
        if client is None and (transport is None or transport.client is None):
            raise kombu_redis.redis.exceptions.ConnectionError(
                "broker connection released before its unacknowledged messages were restored"
            )
        return restore_unacked(self, client)

    qos.ack, qos.reject, qos.restore_unacked = ack, reject, restore_unless_released
    qos._runlens_survives_broker_loss = True
