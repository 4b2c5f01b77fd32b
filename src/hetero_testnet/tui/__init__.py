"""What a person watches: the fold of events into a `RunSnapshot` (`fold`, `snapshot`), pure rendering
(`render`, `chart`, `format`), the live dashboard loop (`live`) and headless progress lines (`headless`).
Reads runs only through `events` and `rundir`.
"""
