"""Ingress: how changes come in and become durable. Webhooks over HTTP (`webhooks`, checked by
`signatures`) and CouchDB feeds followed by `poller`, each committing changes to the outbox
with their checkpoint or webhook id; delivery is only woken, never called."""
