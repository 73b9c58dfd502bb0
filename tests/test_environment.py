"""The machine named in result files."""

import os

from metaopt.environment import cpu_name, device_name


def test_cpu_is_named_with_its_usable_cores():
    name = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert name.endswith(f", {cores} cores") and len(name) > len(f", {cores} cores")
    assert device_name("cpu") == name
