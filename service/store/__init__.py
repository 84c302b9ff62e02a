"""The store: the local database (SQLite or PostgreSQL) and everything kept in it: checkpoints,
the outbox and its leases, dead letters, webhook ids seen. Functions run inside the caller's
transaction; nothing here calls PANDA, CouchDB or HTTP."""
