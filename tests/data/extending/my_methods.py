"""A method as one module: norm tuning (only the normalisation layers' weights and the task head train)."""

from lilyexp.methods.baselines import SavesTrainedWeights
from lilyexp.params import in_head


class NormTuning(SavesTrainedWeights):
    """Trains every LayerNorm/RMSNorm weight and the task head; exports and loads them in lilyexp's format."""

    def __init__(self, head_modules: list[str]):
        self.head_modules = set(head_modules)

    def apply(self, model):
        for name, param in model.named_parameters():
            param.requires_grad = "norm" in name.lower() or in_head(name, self.head_modules)
        return model
