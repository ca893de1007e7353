"""Fetching single packages from Debian's archive with a private apt state.

lobsterd never touches the host's apt configuration: it runs ``apt-get`` with its own
sources list, lists and cache under the image cache. apt checks the archive's signed
``InRelease`` against Debian's keyring and every downloaded ``.deb`` against the hash in
the signed index, so a tampered mirror or a truncated download fails loudly.
"""

from __future__ import annotations

import time
from pathlib import Path

from lobsterd.adapters.proc import run
from lobsterd.errors import ExecFailed, ImageBuildFailed

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LISTS_MAX_AGE_S = 6 * 3600.0
UPDATE_TIMEOUT_S = 300.0
DOWNLOAD_TIMEOUT_S = 900.0


class DebianArchive:
    """A private apt view of one Debian suite (plus its security and updates suites)."""

    def __init__(self, root: Path, suite: str = "bookworm") -> None:
        self.root = root
        self.suite = suite

    @property
    def sources_list(self) -> Path:
        return self.root / "sources.list"

    def sources_text(self) -> str:
        kr = f"[signed-by={DEBIAN_KEYRING}]"
        return (
            f"deb {kr} {DEBIAN_MIRROR} {self.suite} main\n"
            f"deb {kr} {DEBIAN_MIRROR} {self.suite}-updates main\n"
            f"deb {kr} {DEBIAN_SECURITY_MIRROR} {self.suite}-security main\n"
        )

    def _options(self) -> list[str]:
        opts = {
            "Dir::Etc::SourceList": str(self.sources_list),
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::State": str(self.root / "state"),
            "Dir::State::status": "/dev/null",
            "Dir::Cache": str(self.root / "cache"),
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "Acquire::Languages": "none",
            # The download lands in a root-only build directory; what protects it is the
            # hash check against the signed index, which apt does either way.
            "APT::Sandbox::User": "root",
        }
        out: list[str] = []
        for key, value in opts.items():
            out += ["-o", f"{key}={value}"]
        return out

    def _prepare(self) -> None:
        if not DEBIAN_KEYRING.is_file():
            raise ImageBuildFailed(
                f"Debian's archive keyring {DEBIAN_KEYRING} is missing",
                hint="install the debian-archive-keyring package",
            )
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        text = self.sources_text()
        if not self.sources_list.is_file() or self.sources_list.read_text() != text:
            self.sources_list.write_text(text)
            self._stamp().unlink(missing_ok=True)

    def _stamp(self) -> Path:
        return self.root / "state" / "updated"

    def update(self, force: bool = False) -> None:
        """Refresh the package lists when they are older than a few hours (or forced)."""
        self._prepare()
        stamp = self._stamp()
        if not force and stamp.is_file() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE_S:
            return
        try:
            run(["apt-get", *self._options(), "-q", "update"], timeout=UPDATE_TIMEOUT_S)
        except ExecFailed as exc:
            raise ImageBuildFailed(
                f"cannot read Debian's package index: {exc.message}",
                hint="check that deb.debian.org is reachable from this host",
            ) from None
        stamp.touch()

    def download(self, package: str, version: str | None, dest: Path) -> Path:
        """Download ``package`` (exactly ``version`` if given) into ``dest``; return the file.

        Retries once with freshly updated lists, because a stale index points at files
        the archive may already have removed.
        """
        spec = f"{package}={version}" if version else package
        dest.mkdir(parents=True, exist_ok=True)
        for attempt in (0, 1):
            self.update(force=attempt == 1)
            for old in dest.glob(f"{package}_*.deb"):
                old.unlink()
            res = run(
                ["apt-get", *self._options(), "-q", "download", spec],
                timeout=DOWNLOAD_TIMEOUT_S,
                cwd=str(dest),
                check=False,
            )
            found = sorted(dest.glob(f"{package}_*.deb"))
            if res.ok and len(found) == 1:
                return found[0]
        lines = (res.stderr or res.stdout).strip().splitlines()
        tail = lines[-1] if lines else f"exit {res.returncode}"
        raise ImageBuildFailed(
            f"cannot download {spec} from Debian's archive: {tail}",
            hint="the archive may no longer carry this version; choose one it serves",
        )
