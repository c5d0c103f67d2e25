"""Where untrusted work runs: a pool of isolated zygotes (``pool``, ``zygote``), the judge and candidate sides
of a code job (``harness``, ``candidate``) and the plain-data channel between them (``wire``)."""
