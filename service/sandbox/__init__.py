"""The sandbox: a PANDA-compatible server (`fake_panda`) and the end-to-end demo, for trying
pandasync and testing it. Nothing in the service imports it; only the CLI's `fake-panda` and
`demo` commands start it."""
