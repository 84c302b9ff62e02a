"""pandasync: replicate changes from CouchDB feeds and webhooks into PANDA datasets."""
