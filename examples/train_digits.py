"""Train a small CNN on handwritten digits with NumPy and fastconv: no deep-learning framework.

The data set is scikit-learn's 8x8 digits (1,797 images), which ships inside the package: nothing is
downloaded. The network is conv(1->16, 3x3) -> ReLU -> 2x2 max-pool -> conv(16->32, 3x3) -> ReLU -> linear(512->10),
trained with plain minibatch SGD on the softmax cross-entropy.

    python examples/train_digits.py             # about 20 s on 2 cores, ~98 % test accuracy
    python examples/train_digits.py --epochs 3
"""

import argparse
import sys
import time

import numpy as np

from fastconv.nn import Conv2d


def load_digits(seed=0):
    """Train and test splits of the 8x8 digits, scaled to [0, 1], as (N, 1, 8, 8) float32 and int labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.8 * len(images))
    train, test = order[:split], order[split:]
    return images[train], digits.target[train], images[test], digits.target[test]


class MaxPool2x2:
    """2x2 max-pooling with stride 2; backward sends each gradient to the position of its maximum."""

    def forward(self, x):
        N, C, H, W = x.shape
        windows = x.reshape(N, C, H // 2, 2, W // 2, 2)
        out = windows.max(axis=(3, 5))
        self._mask = windows == out[:, :, :, None, :, None]
        return out

    def backward(self, grad):
        spread = self._mask * grad[:, :, :, None, :, None]
        return spread.reshape(spread.shape[0], spread.shape[1], spread.shape[2] * 2, spread.shape[4] * 2)


class ReLU:
    def forward(self, x):
        self._positive = x > 0
        return x * self._positive

    def backward(self, grad):
        return grad * self._positive


class Linear:
    """``y = x @ W.T + b`` with PyTorch's default initialisation."""

    def __init__(self, in_features, out_features, rng):
        bound = 1 / np.sqrt(in_features)
        self.weight = rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32)
        self.bias = rng.uniform(-bound, bound, out_features).astype(np.float32)

    def forward(self, x):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, grad):
        self.grad_weight = grad.T @ self._x
        self.grad_bias = grad.sum(axis=0)
        return grad @ self.weight

    def parameters(self):
        return [self.weight, self.bias]

    def gradients(self):
        return [self.grad_weight, self.grad_bias]

    def zero_grad(self):
        pass  # gradients are overwritten on every backward


class Network:
    def __init__(self, rng):
        self.conv1 = Conv2d(1, 16, 3, padding=1, rng=rng)
        self.conv2 = Conv2d(16, 32, 3, padding=1, rng=rng)
        self.fc = Linear(32 * 4 * 4, 10, rng)
        self.layers = [self.conv1, ReLU(), MaxPool2x2(), self.conv2, ReLU()]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        self._shape = x.shape
        return self.fc.forward(x.reshape(len(x), -1))

    def backward(self, grad):
        grad = self.fc.backward(grad).reshape(self._shape)
        for layer in reversed(self.layers):
            grad = layer.backward(grad)

    def trainable(self):
        return [self.conv1, self.conv2, self.fc]


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    loss = -np.log(probabilities[np.arange(len(labels)), labels] + 1e-12).mean()
    grad = probabilities
    grad[np.arange(len(labels)), labels] -= 1
    return loss, grad / len(labels)


def accuracy(network, images, labels, batch=256):
    correct = 0
    for i in range(0, len(images), batch):
        correct += (network.forward(images[i : i + batch]).argmax(axis=1) == labels[i : i + batch]).sum()
    return correct / len(images)


def train(epochs=15, batch_size=32, learning_rate=0.1, seed=0, progress=sys.stderr):
    """Train and return ``(network, history)``; history holds each epoch's mean loss and test accuracy."""
    rng = np.random.default_rng(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    network = Network(rng)
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(len(x_train))
        losses = []
        batches = range(0, len(order), batch_size)
        for step, i in enumerate(batches, 1):
            index = order[i : i + batch_size]
            for layer in network.trainable():
                layer.zero_grad()
            loss, grad = cross_entropy(network.forward(x_train[index]), y_train[index])
            network.backward(grad)
            for layer in network.trainable():
                for parameter, gradient in zip(layer.parameters(), layer.gradients()):
                    parameter -= learning_rate * gradient
            losses.append(loss)
            if progress and (30 * step // len(batches)) != (30 * (step - 1) // len(batches)):
                bar = "#" * (30 * step // len(batches))
                print(f"\repoch {epoch:2d}/{epochs} [{bar:<30}] loss {np.mean(losses):.4f}", end="", file=progress)
        test_accuracy = accuracy(network, x_test, y_test)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "test_accuracy": float(test_accuracy)})
        if progress:
            seconds = time.perf_counter() - start
            print(
                f"\repoch {epoch:2d}/{epochs} [{'#' * 30}] loss {np.mean(losses):.4f} "
                f"test accuracy {test_accuracy:.2%} ({seconds:.1f} s)",
                file=progress,
            )
    return network, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _, history = train(args.epochs, args.batch_size, args.learning_rate)
    print(
        f"test accuracy {history[-1]['test_accuracy']:.2%} after {args.epochs} epochs in "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
