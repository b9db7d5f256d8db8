"""Tooling to measure and try the pipeline without a shop or a Klaviyo account: the traffic simulator (`simulate`),
its day-by-day replay (`replay`), the score against its ground truth (`evaluation`, `sweep`) and the local Klaviyo
emulator (`klaviyo_emulator`, which needs the `emulator` extra for Klaviyo's SDK models).

Apart from the pipeline so that a reader sees what runs in production and what only measures it: nothing in
`upstack_pipeline` outside this package imports it, and the `upstack` command imports it only in the commands
that need it (simulate, evaluate, demo, klaviyo-emulator).
"""
