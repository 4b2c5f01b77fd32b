"""Token data: the shard format and sample indexing (`shards`), the exact GPT-2 tokenizer (`tokenizer`),
the public-domain sources (`sources`) and `testnet data prepare` (`prepare`); the bundled shards live in
`sample/`.
"""
