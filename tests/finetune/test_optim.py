import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from agreement.schedules import steps_per_epoch
from ssl3d.finetune.optim import scheduler_config


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: dict[str, float] = {}

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        self.seen = {
            "per_epoch": steps_per_epoch(self.trainer),
            "total": self.trainer.estimated_stepping_batches,
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(optimizer, self.seen["total"], 0)}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=3)  # 4 batches


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "accumulate", "per_epoch", "total"),
    [(-1, 9, 1, 4, 9), (5, 6, 1, 4, 6), (2, -1, 1, 4, 8), (-1, 5, 2, 2, 5)],
)
def test_steps_per_epoch_is_the_loader_length_however_the_run_is_bounded(
    max_epochs, max_steps, accumulate, per_epoch, total
):
    model = _Tiny()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert model.seen == {"per_epoch": per_epoch, "total": total}
