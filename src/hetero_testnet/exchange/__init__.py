"""The gradient path between clients: the buffer layout and the exact masked average as tensor math
(`aggregation`), the process group of each membership generation (`group`), the reducer that does one
step's whole reduction (`reducer`), the sync strategies behind one interface (`strategies`), injected
network faults (`faults`), and DeMo's DCT/top-k codec (`dct`, `demo_layout`, `demo_codec`).
"""
