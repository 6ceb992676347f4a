"""The Parallax benchmark harness (`make bench`): Parallax and its peers, side by side.

Python standard library only, so a fresh Debian machine needs nothing beyond `scripts/deps.sh
bench`. `bench/run.py` is the entry point; bench/README.md explains what is measured and how.
"""
