"""The durable queue: accepted events wait here until the upstream takes them.

``base`` declares the interface (``Queue``) and its refusals; ``rows`` the
row format and the packing of a request's events; ``sqlite`` the spool on one
host (its file in ``sqlfile``, its operator's side in ``admin``);
``jetstream`` the queue a fleet shares on NATS JetStream.
"""
