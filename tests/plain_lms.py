"""Plain torch language models, written as a new user would (no mpnas code), and a learnable token stream."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 50
WIDTH = 16
CONTEXT = 64  # the plain Transformer's positional table; the data section's default window


class PlainLSTM(nn.Module):
    """nn.Embedding + nn.LSTM + nn.Linear; ``forward(tokens, state)`` returns ``(logits, state)``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, WIDTH, batch_first=True)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(self.embedding(tokens), state)
        return self.decoder(out), state


class PlainTransformer(nn.Module):
    """Token and learned position embeddings, a causal nn.TransformerEncoder, nn.Linear; returns logits."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        time = tokens.size(1)
        x = self.embedding(tokens) + self.positions(torch.arange(time, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(time, device=tokens.device)
        return self.decoder(self.encoder(x, mask=mask, is_causal=True))


def token_stream(length: int, seed: int = 0) -> torch.Tensor:
    """A first-order Markov chain over ``VOCAB`` words with 3 likely successors each: learnable."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    tokens = [0]
    choices = torch.randint(0, 3, (length,), generator=g)
    noise = torch.rand(length, generator=g)
    random_words = torch.randint(0, VOCAB, (length,), generator=g)
    for i in range(1, length):
        nxt = successors[tokens[-1], choices[i]] if noise[i] > 0.1 else random_words[i]
        tokens.append(int(nxt))
    return torch.tensor(tokens)


def pretrain(model: nn.Module, stream: torch.Tensor, steps: int = 40, seed: int = 0) -> nn.Module:
    """A few Adam steps of next-token prediction on windows of 32 tokens (the user's own training)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - 33, (16,), generator=g)
        x = torch.stack([stream[s : s + 32] for s in starts.tolist()])
        y = torch.stack([stream[s + 1 : s + 33] for s in starts.tolist()])
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
