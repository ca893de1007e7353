"""The one exception hierarchy of lobsterd.

Every failure an operator can see carries a stable ``code`` (scripts match on it) and a
one-line ``message`` that says what went wrong and, where possible, what to do. The CLI
prints ``error[CODE]: message`` and exits non-zero; the API maps ``http_status`` onto the
response. Messages must never contain secret values.
"""

from __future__ import annotations

from typing import ClassVar


class LobsterError(Exception):
    """Base of every error lobsterd reports on purpose."""

    code: ClassVar[str] = "UNKNOWN"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


class ValidationFailed(LobsterError):
    code = "VALIDATION_FAILED"
    http_status = 422
    exit_code = 2


class ConfigInvalid(LobsterError):
    code = "CONFIG_INVALID"
    http_status = 500


class RegistryCorrupt(LobsterError):
    code = "REGISTRY_CORRUPT"
    http_status = 500


class NotRoot(LobsterError):
    code = "NOT_ROOT"
    http_status = 403


class NotLinux(LobsterError):
    code = "NOT_LINUX"


class TenantExists(LobsterError):
    code = "TENANT_EXISTS"
    http_status = 409


class TenantNotFound(LobsterError):
    code = "TENANT_NOT_FOUND"
    http_status = 404


class TenantBusy(LobsterError):
    """Another process holds this tenant's operation lock."""

    code = "TENANT_BUSY"
    http_status = 409


class IllegalTransition(LobsterError):
    code = "ILLEGAL_TRANSITION"
    http_status = 409


class CapacityExhausted(LobsterError):
    code = "CAPACITY_EXHAUSTED"
    http_status = 507


class ExecFailed(LobsterError):
    code = "EXEC_FAILED"


class ExecTimeout(LobsterError):
    code = "EXEC_TIMEOUT"
    http_status = 504


class ImageMissing(LobsterError):
    code = "IMAGE_MISSING"
    http_status = 503


class ImageBuildFailed(LobsterError):
    code = "IMAGE_BUILD_FAILED"


class VmBootFailed(LobsterError):
    code = "VM_BOOT_FAILED"
    http_status = 502


class VmmError(LobsterError):
    code = "VMM_ERROR"
    http_status = 502


class AgentUnreachable(LobsterError):
    code = "AGENT_UNREACHABLE"
    http_status = 502


class AgentRejected(LobsterError):
    code = "AGENT_REJECTED"
    http_status = 502


class NetworkSetupFailed(LobsterError):
    code = "NETWORK_SETUP_FAILED"


class FirewallError(LobsterError):
    code = "FIREWALL_ERROR"


class CaddyApiError(LobsterError):
    code = "CADDY_API_ERROR"
    http_status = 502


class CaError(LobsterError):
    """The host certificate authority is missing, unreadable or inconsistent."""

    code = "CA_ERROR"


class EvictIncomplete(LobsterError):
    """Some of a tenant's resources could not be removed; the tenant stays registered
    (status ``removing``) so that a retry can finish the job."""

    code = "EVICT_INCOMPLETE"


class StorageError(LobsterError):
    code = "STORAGE_ERROR"


class CgroupError(LobsterError):
    code = "CGROUP_ERROR"


class SecretsError(LobsterError):
    code = "SECRETS_ERROR"


class MasterKeyError(LobsterError):
    code = "MASTER_KEY_ERROR"


class DecryptionFailed(LobsterError):
    """Encrypted data failed authentication: modified, truncated, moved or wrong key."""

    code = "DECRYPTION_FAILED"


class AuditError(LobsterError):
    code = "AUDIT_ERROR"


class HostUnsafe(LobsterError):
    """doctor found a FAIL and the operator did not accept the risk."""

    code = "HOST_UNSAFE"
    http_status = 503


class PermissionDenied(LobsterError):
    code = "PERMISSION_DENIED"
    http_status = 401
