"""The FUSE layer: translates kernel requests into store calls and owns no disk I/O."""
