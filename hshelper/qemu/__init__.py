"""The VM side: from a machine row to a finished run, one module per job.

- ``machines``: the per-architecture table (machine, CPU model, console, slots);
- ``argv``: qemu's command line from a row and a boot spec (pure);
- ``kernelfmt``, ``vmlinux``, ``kernelimage``: which kernel file qemu boots;
- ``probe``: whether KVM really runs a guest here;
- ``process``: starting qemu so it never outlives hshelper;
- ``channels``: the host ends of the guest's ports and the loop serving them;
- ``qmp``: qemu's control channel;
- ``savedstate``: saved VM states as cache entries;
- ``vm``: one VM run, from start to its classified end (``outcome``, pure).
"""
