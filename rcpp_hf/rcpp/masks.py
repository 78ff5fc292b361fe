"""Stage 6 — the attention mask that lets one forward compute logits_C and logits_N for the same token."""

from __future__ import annotations

import torch


def drcd_attention_mask(
    valid: torch.Tensor, visual_ids: torch.Tensor, core: torch.Tensor, noise: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """4-D boolean mask (True = attend) for `num_rows` query rows of the same token at the same position.

    Row 0 (main) sees what the cache holds except N; row 1 (contrast, if `num_rows == 2`) sees it except C: text,
    history, and the row's own visual group. Each row sees its own new entry and not the other's.

    Args:
        valid: (B, L) non-padding cache entries.
        visual_ids: (B, L) visual-token id of each entry (0..V-1), -1 for text.
        core, noise: (B, V) membership of C and N by visual-token id (tokens in neither are seen by both rows).
    Returns:
        (B, 1, num_rows, L + num_rows)
    """
    batch = valid.shape[0]
    index = visual_ids.clamp_min(0)
    is_visual = visual_ids >= 0
    in_core = is_visual & core.gather(1, index)
    in_noise = is_visual & noise.gather(1, index)
    rows = [valid & ~in_noise]
    if num_rows == 2:
        rows.append(valid & ~in_core)
    past = torch.stack(rows, dim=1)  # (B, rows, L)
    own = torch.eye(num_rows, dtype=torch.bool, device=valid.device).expand(batch, -1, -1)
    return torch.cat([past, own], dim=2)[:, None]
