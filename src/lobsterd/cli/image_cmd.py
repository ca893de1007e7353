"""``lobsterd image``: build, show and verify the guest image."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from lobsterd.cli.context import CliState, emit_json, pass_state
from lobsterd.errors import ImageMissing

if TYPE_CHECKING:
    from lobsterd.image.artifacts import ImageArtifacts


class _StagePrinter:
    """Prints each progress line to stderr, and each stage's duration when it ends."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.stage: str | None = None
        self.t_stage = self.t_start = time.monotonic()

    def __call__(self, stage: str, detail: str) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self._close(now)
            self.stage, self.t_stage = stage, now
        if detail and not self.quiet:
            click.echo(f"  [{stage}] {detail}", err=True)

    def _close(self, now: float) -> None:
        if self.stage is not None and not self.quiet and self.stage != "done":
            click.echo(f"  [{self.stage}] done in {now - self.t_stage:.1f} s", err=True)

    def finish(self) -> float:
        now = time.monotonic()
        self._close(now)
        self.stage = None
        return now - self.t_start


def _summary(art: ImageArtifacts) -> dict[str, Any]:
    manifest = art.manifest()
    files = {
        name: {"path": str(art.dir / name), **entry} for name, entry in manifest["files"].items()
    }
    return {
        "key": art.key,
        "variant": art.variant,
        "dir": str(art.dir),
        "kernel_version": art.kernel_version,
        "kernel_package_version": manifest.get("kernel", {}).get("package_version"),
        "built_at": manifest.get("built_at"),
        "build_seconds": manifest.get("build_seconds"),
        "files": files,
        "initramfs_modules": manifest.get("initramfs", {}).get("modules", []),
        "packages": len(manifest.get("rootfs", {}).get("packages", {})),
    }


def _up_to_date(art: ImageArtifacts) -> bool | None:
    """Whether a build now would produce this image (None: cannot tell)."""
    from lobsterd.errors import LobsterError
    from lobsterd.image.build import expected_key

    kernel = art.manifest().get("inputs", {}).get("kernel", {})
    try:
        return art.key == expected_key(
            art.variant,
            kernel_release=kernel.get("release", art.kernel_version),
            kernel_package_version=kernel.get("package_version", ""),
        )
    except (LobsterError, OSError):
        return None


def _print_summary(data: dict[str, Any]) -> None:
    click.echo(f"image     {data['key']} ({data['variant']})")
    click.echo(f"dir       {data['dir']}")
    click.echo(f"kernel    {data['kernel_version']} ({data['kernel_package_version']})")
    click.echo(f"built     {data['built_at']} in {data['build_seconds']} s")
    for name, entry in data["files"].items():
        click.echo(f"  {name:<12} {entry['size'] / 2**20:9.1f} MiB  sha256 {entry['sha256'][:16]}…")
    click.echo(f"modules   {' '.join(data['initramfs_modules'])}")
    click.echo(f"packages  {data['packages']} Debian packages in the rootfs")
    if data.get("up_to_date") is False:
        click.echo("stale     guest files or recipe changed since; run: lobsterd image build")


@click.group("image")
def image() -> None:
    """Build and inspect the guest image (kernel, initramfs, read-only rootfs)."""


@image.command("build")
@click.option("--variant", default="test", show_default=True, help="test | openclaw")
@click.option("--force", is_flag=True, help="Rebuild even if an identical image exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--kernel-release", default=None, help="Debian kernel, e.g. 6.1.0-57-cloud-amd64.")
@click.option("--kernel-package-version", default=None, help="Its package version.")
@pass_state
def build_cmd(
    state: CliState,
    variant: str,
    force: bool,
    as_json: bool,
    kernel_release: str | None,
    kernel_package_version: str | None,
) -> None:
    """Build the guest image from Debian's archive (cached: unchanged inputs cost nothing)."""
    from lobsterd.image import kernel
    from lobsterd.image.build import build_image

    if (kernel_release is None) != (kernel_package_version is None):
        raise click.UsageError("give --kernel-release and --kernel-package-version together")
    printer = _StagePrinter(quiet=False)
    art = build_image(
        state.config,
        variant=variant,
        force=force,
        progress=printer,
        kernel_release=kernel_release or kernel.DEFAULT_KERNEL_RELEASE,
        kernel_package_version=kernel_package_version or kernel.DEFAULT_KERNEL_PACKAGE_VERSION,
    )
    took = printer.finish()
    data = _summary(art)
    data["seconds"] = round(took, 2)
    if as_json:
        emit_json(data)
    else:
        _print_summary(data)
        click.echo(f"ready in {took:.1f} s")


@image.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_state
def show_cmd(state: CliState, as_json: bool) -> None:
    """Show the current image: key, kernel version, files and sizes."""
    from lobsterd.image.artifacts import find_image

    art = find_image(state.config)
    data = _summary(art)
    data["up_to_date"] = _up_to_date(art)
    if as_json:
        emit_json(data)
    else:
        _print_summary(data)


@image.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_state
def verify_cmd(state: CliState, as_json: bool) -> None:
    """Re-hash the current image's files against its manifest."""
    from lobsterd.image.artifacts import find_image, verify_image

    art = find_image(state.config)
    problems = verify_image(art)
    if as_json:
        emit_json({"key": art.key, "ok": not problems, "problems": problems})
    if problems:
        if not as_json:
            for line in problems:
                click.echo(f"  {line}", err=True)
        raise ImageMissing(
            f"image {art.key} is damaged ({len(problems)} problem(s))",
            hint="run: lobsterd image build",
        )
    if not as_json:
        click.echo(f"image {art.key}: all files match the manifest")


COMMANDS: list[click.Command] = [image]
