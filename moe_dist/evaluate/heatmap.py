"""The expert-by-domain heatmap, P(expert | domain): one drawing for TensorBoard and for
`tools/evaluate.py --heatmap`, so the two pictures of a run read the same way.

Legend: moe_dist/moe/__init__.py (E experts, L labels).
"""

from __future__ import annotations

import numpy as np


def draw_expert_by_domain(fig, ax, joint_EL, domain_names: list[str], layer: int) -> None:
    """Columns are domains, each normalized to sum to 1 (an empty column stays 0); unnamed label
    ids are shown by number."""
    joint_EL = np.asarray(joint_EL, dtype=float)
    E, L = joint_EL.shape
    p_EL = joint_EL / np.maximum(joint_EL.sum(0, keepdims=True), 1.0)
    im = ax.imshow(p_EL, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(p_EL.max()), 1e-6))
    names = (list(domain_names) + [str(i) for i in range(len(domain_names), L)])[:L]
    ax.set_xticks(range(L), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(E))
    ax.set_xlabel("domain")
    ax.set_ylabel("expert")
    ax.set_title(f"layer {layer}: P(expert | domain)")
    fig.colorbar(im, ax=ax)
