"""Delivery: outbox entries to PANDA. `engine` claims, sends and settles batches; `batching`
plans them and sizes them, `breaker` backs a failing dataset off; `panda` is the PANDA HTTP
client, which knows no database."""
