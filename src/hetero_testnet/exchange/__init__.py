"""The gradient path between clients: the buffer layout and the exact masked average as tensor math
(`aggregation`), the process group of each membership generation (`group`), the reducer that does one
step's whole reduction (`reducer`), the sync strategies behind one interface (`strategies`), injected
network faults (`faults`), DeMo's DCT/top-k codec (`dct`, `demo_layout`, `demo_codec`), and what a client
does with a round in each `--sync` mode (`stepper`, `demo_stepper`, `diloco_stepper`; `modes` pairs each
mode's strategy and stepper).
"""
