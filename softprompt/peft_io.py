"""placeholder"""
import torch
def kv_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, H, P, D) -> PEFT's (P, L*2*H*D)."""
    L, two, H, P, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * H * D)
