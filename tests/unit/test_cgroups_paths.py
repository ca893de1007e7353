"""cgroup path and format logic against fabricated /sys/fs/cgroup trees (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lobsterd.adapters.cgroups import (
    Cgroup,
    CgroupLayout,
    check_leaf,
    detect_layout,
    limit_writes,
)
from lobsterd.errors import CgroupError

MIB = 1 << 20


def v2_tree(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> Path:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


def v1_tree(root: Path, controllers: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids"),
            memsw: bool = True) -> Path:
    for c in controllers:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")
    if memsw and "memory" in controllers:
        (root / "memory" / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "unified").mkdir()  # hybrid host: an empty cgroup2 beside the v1 controllers
    return root


def test_detect_v2(tmp_path: Path) -> None:
    layout = detect_layout(v2_tree(tmp_path))
    assert layout.version == 2
    assert layout.leaf_dirs("tenant-a") == {"": tmp_path / "lobsterd" / "tenant-a"}


def test_detect_v2_missing_controllers(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="memory"):
        detect_layout(v2_tree(tmp_path, "cpu pids"))


def test_detect_hybrid_is_v1(tmp_path: Path) -> None:
    layout = detect_layout(v1_tree(tmp_path))
    assert layout.version == 1
    assert set(layout.controllers) == {"memory", "cpu", "cpuacct", "pids"}
    dirs = layout.leaf_dirs("tenant-a")
    assert dirs["memory"] == tmp_path / "memory" / "lobsterd" / "tenant-a"
    assert dirs["pids"] == tmp_path / "pids" / "lobsterd" / "tenant-a"


def test_detect_nothing(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="not mounted"):
        detect_layout(tmp_path)
    with pytest.raises(CgroupError, match="pids"):
        detect_layout(v1_tree(tmp_path / "x", ("memory", "cpu")))


@pytest.mark.parametrize("leaf", ["", "..", "a/b", "Tenant", "-x", "a b", "x" * 101, "a\n"])
def test_leaf_names(leaf: str) -> None:
    with pytest.raises(CgroupError):
        check_leaf(leaf)


def test_limit_writes_v2() -> None:
    layout = CgroupLayout(2, Path("/cg"), ("cpu", "memory", "pids"))
    writes = limit_writes(layout, "tenant-a", mem_bytes=1280 * MIB, cpu_quota_us=200_000,
                          cpu_period_us=100_000, pids_max=512, has_memsw=False,
                          has_swap_max=True)
    d = Path("/cg/lobsterd/tenant-a")
    assert writes == [
        (d / "memory.max", str(1280 * MIB)),
        (d / "memory.swap.max", "0"),
        (d / "cpu.max", "200000 100000"),
        (d / "pids.max", "512"),
    ]


def test_limit_writes_v1() -> None:
    layout = CgroupLayout(1, Path("/cg"), ("memory", "cpu", "pids"))
    writes = limit_writes(layout, "tenant-a", mem_bytes=1152 * MIB, cpu_quota_us=200_000,
                          cpu_period_us=100_000, pids_max=64, has_memsw=True,
                          has_swap_max=False)
    assert writes == [
        (Path("/cg/memory/lobsterd/tenant-a/memory.limit_in_bytes"), "1207959552"),
        (Path("/cg/memory/lobsterd/tenant-a/memory.memsw.limit_in_bytes"), "1207959552"),
        (Path("/cg/cpu/lobsterd/tenant-a/cpu.cfs_period_us"), "100000"),
        (Path("/cg/cpu/lobsterd/tenant-a/cpu.cfs_quota_us"), "200000"),
        (Path("/cg/pids/lobsterd/tenant-a/pids.max"), "64"),
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"mem_bytes": 1 * MIB},
        {"cpu_quota_us": 10},
        {"cpu_period_us": 500},
        {"cpu_period_us": 2_000_000},
        {"pids_max": 0},
    ],
)
def test_limit_writes_rejects(kw: dict[str, int]) -> None:
    args = {"mem_bytes": 512 * MIB, "cpu_quota_us": 100_000, "cpu_period_us": 100_000,
            "pids_max": 10}
    args.update(kw)
    layout = CgroupLayout(2, Path("/cg"), ("cpu", "memory", "pids"))
    with pytest.raises(CgroupError):
        limit_writes(layout, "t", has_memsw=False, has_swap_max=False, **args)


def test_create_v2_tree(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    cg = Cgroup.create("tenant-bob", 1280 * MIB, 200_000, 100_000, 256, root=root)
    leaf = root / "lobsterd" / "tenant-bob"
    assert leaf.is_dir()
    enabled = (root / "cgroup.subtree_control").read_text().split()
    assert {"+memory", "+cpu", "+pids"} <= set(enabled)
    assert set((root / "lobsterd" / "cgroup.subtree_control").read_text().split()) >= {
        "+memory", "+cpu", "+pids"}
    assert (leaf / "memory.max").read_text() == str(1280 * MIB)
    assert (leaf / "cpu.max").read_text() == "200000 100000"
    assert (leaf / "pids.max").read_text() == "256"
    assert cg.procs_files() == [leaf / "cgroup.procs"]
    # a fabricated kernel view: stats read the v2 files
    (leaf / "memory.current").write_text("123456\n")
    (leaf / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\nsystem_usec 2\n")
    (leaf / "cgroup.procs").write_text("42\n43\n")
    st = cg.stats()
    assert (st.memory_bytes, st.memory_limit_bytes, st.cpu_seconds, st.pids) == (
        123456, 1280 * MIB, 2.5, 2)
    assert cg.pids() == [42, 43]


def test_create_v1_tree(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    cg = Cgroup.create("tenant-bob", 1152 * MIB, 200_000, 100_000, 100, root=root)
    mem = root / "memory" / "lobsterd" / "tenant-bob"
    (mem / "memory.memsw.limit_in_bytes").write_text("9223372036854771712")
    cg.set_limits(1152 * MIB, 200_000, 100_000, 100)  # memsw now present: written too
    assert (mem / "memory.limit_in_bytes").read_text() == "1207959552"
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == "1207959552"
    cpu = root / "cpu" / "lobsterd" / "tenant-bob"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "200000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (root / "pids" / "lobsterd" / "tenant-bob" / "pids.max").read_text() == "100"
    assert len(cg.procs_files()) == 4  # memory, cpu, cpuacct, pids
    (root / "cpuacct" / "lobsterd" / "tenant-bob" / "cpuacct.usage").write_text("1500000000")
    (mem / "memory.usage_in_bytes").write_text("4096")
    st = cg.stats()
    assert (st.memory_bytes, st.cpu_seconds) == (4096, 1.5)


def test_v1_comounted_cpu_cpuacct_acts_once(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, ("memory", "pids"))
    both = root / "cpu,cpuacct"
    both.mkdir()
    (both / "cgroup.procs").write_text("")
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    cg = Cgroup.create("tenant-c", 512 * MIB, 100_000, root=root)
    assert len(cg.procs_files()) == 3


def test_enter_fn_writes_own_pid(tmp_path: Path) -> None:
    import os

    root = v2_tree(tmp_path)
    cg = Cgroup.create("tenant-d", 512 * MIB, 100_000, root=root)
    (root / "lobsterd" / "tenant-d" / "cgroup.procs").write_text("")  # the kernel's file
    cg.enter_fn()()
    assert (root / "lobsterd" / "tenant-d" / "cgroup.procs").read_text() == str(os.getpid())


def test_longest_tenant_name_fits() -> None:
    """Names are DNS labels of up to 63 characters; the leaf must take all of them."""
    from lobsterd.core.names import cgroup_name

    name = "a" + "b" * 61 + "c"
    assert check_leaf(cgroup_name(name)) == f"tenant-{name}"
