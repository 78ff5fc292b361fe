"""Stage 6 — the attention mask that lets one forward compute logits_C and logits_N for the same token."""

from __future__ import annotations

import torch


def drcd_attention_mask(
    valid: torch.Tensor, visual_slots: torch.Tensor, core: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """4-D boolean mask (True = attend) for `num_rows` query rows of the same token at the same position.

    Row 0 (main) sees text, history and the core visual tokens C; row 1 (contrast, if `num_rows == 2`) sees text,
    history and the noise tokens N. Each row sees its own new entry and not the other's.

    Args:
        valid: (B, L) non-padding cache entries.
        visual_slots: (B, Vc) physical cache index of each cached visual token.
        core: (B, Vc) membership of C.
    Returns:
        (B, 1, num_rows, L + num_rows)
    """
    batch = valid.shape[0]
    main = valid.scatter(1, visual_slots, valid.gather(1, visual_slots) & core)
    rows = [main]
    if num_rows == 2:
        rows.append(valid.scatter(1, visual_slots, valid.gather(1, visual_slots) & ~core))
    past = torch.stack(rows, dim=1)  # (B, rows, L)
    own = torch.eye(num_rows, dtype=torch.bool, device=valid.device).expand(batch, -1, -1)
    return torch.cat([past, own], dim=2)[:, None]
