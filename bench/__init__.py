"""Benchmarks of ovirt-borg against the ways people back up oVirt disks into Borg today.

``python -m bench`` (or ``make bench``) starts a lab of its own, fills VM disks with a known
mix of data (half random, a quarter compressible text-like data, a quarter holes) and measures,
side by side in the same run and with the same repository settings:

1. a full backup with ovirt-borg, against ``borg create`` of the same image as a local raw file
   (fixed 4 MiB chunker: Borg's own ingest speed) and against the two-step way
   (``ovirt_imageio.client.download`` to a local qcow2 file, then ``borg create`` of it);
2. incremental backups after guest writes of 0.1%, 1% and 10% of the disk, scattered 64 KiB
   writes and one sequential run, against the two-step incremental, with the bytes each read
   from imageio against the dirty bytes (the writes rounded to the bitmap's 64 KiB);
3. restore of the newest archive into a new disk, against ``ovirt_imageio.client.upload`` of
   a local file and against the two-step restore (``borg extract`` to a file, then upload);
4. CPU seconds per GiB of random, text-like and zero data: ovirt-borg against ``borg create``,
   and the floor, what Borg's own key and compressor objects need for the same blocks;
5. a large sparse disk (1 TiB provisioned, a few GiB written): full and incremental, and the
   metadata each archive adds to the repository;
6. peak memory and CPU use of every contender, and a py-spy profile of ovirt-borg's full backup;
7. alone, with ``--case night``: N small VMs under the engine's latency, backed up one after
   another against one ovirt-borg run, and against the VMs' data phases plus one VM's latency.

Every contender runs as a subprocess; the JSON written to ``bench/results/`` keeps every run,
the medians and the ratios. Modules: ``cli`` (options), ``run`` (the cases), ``night`` (the
night case), ``image`` (disk content and guest writes), ``measure`` (wall time, CPU, memory),
``contenders`` (the baselines' own programs), ``borgrepo`` (repositories and archive
metadata), ``profile`` (py-spy) and ``report`` (medians, ratios, tables).
"""
