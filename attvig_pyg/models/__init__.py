"""Models, registered with timm: AttentionViG (attentionvig_s/m/b) and the isotropic Vision GNN
aggregation harness (vig_ti/s/b)."""
from attvig_pyg.models.attentionvig import AttentionViG
from attvig_pyg.models.vig import ViG

__all__ = ["AttentionViG", "ViG"]
