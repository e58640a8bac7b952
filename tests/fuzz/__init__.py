"""Fuzzers: the frame decoder, the protocol state machine and the NBD request parser.

The default profile keeps ``make test`` fast; the ``long`` variants (``make test-long``)
run enough examples that the three files together exceed 100,000 cases. The number of
cases each test ran is printed at the end of the session (see ``conftest.py``).
``atheris_frames.py`` is a coverage-guided harness run by hand, not by pytest.
"""
