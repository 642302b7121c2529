"""The 2-layer CNN of the LAMB16 MNIST figures (431,080 parameters)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MnistCNN(nn.Module):
    """conv 1->20 (5x5) -> ReLU -> max-pool 2 -> conv 20->50 (5x5) -> ReLU -> max-pool 2
    -> linear 800->500 -> ReLU -> linear 500->10 -> log-softmax.

    Takes normalized 1x28x28 images, returns log-probabilities (train with NLL loss).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, stride=1)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, stride=1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)
