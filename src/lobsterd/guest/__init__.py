"""Code that runs inside the guest VM.

Every module here uses the Python standard library only: the guest image carries Debian's
``python3`` and nothing from PyPI. Modules are installed side by side as plain files
(``/usr/lib/lobster/agent.py``, ``/sbin/lobster-init``, ``/usr/local/bin/lobster-gateway``),
so they must not import each other through the ``lobsterd`` package.
"""
