"""Graph passes. One pass per file; each counts the sites it matched (see PassReport)."""
from dataclasses import dataclass


@dataclass
class PassReport:
    """What one pass matched against what the model says it should match."""

    name: str
    matched: int = 0
    expected: int = 0

    def check(self) -> None:
        from ..errors import InternalError

        if self.expected and self.matched != self.expected:
            raise InternalError(f"pass {self.name} matched {self.matched} of {self.expected} expected sites")

    def __str__(self) -> str:
        return f"{self.name}: {self.matched}/{self.expected}"


def all_passes():
    """The passes, in order. Each module has NAME, OP_NAME, expected_sites(config), install(model)
    (capture side: route transformers' modules through our op) and converter(report, kv_cache)
    (lower side: the op → Relax)."""
    from . import fuse_moe_routing, route_attention_to_kv_cache

    return [route_attention_to_kv_cache, fuse_moe_routing]
