"""Chapter 05: talk to the tuned GPT, as nanoGPT keeps sample.py beside train.py.

    python 05_gpt/chat.py                                   # the latest tuned model in out/05_gpt (DPO, else SFT)
    python 05_gpt/chat.py --init_from SmolLM2-135M-Instruct --temperature 0.7 --top_p 0.9
    printf 'What does `json.dumps` do?\\nAnd `json.loads`?\\n/quit\\n' | python 05_gpt/chat.py

(`python 05_gpt/train.py --stage chat` is the same thing.) What it has:
- chat templates: ChatML (`<|im_start|>role\\n ... <|im_end|>`, ours and Qwen's / SmolLM2's), Llama 3's
  headers, and a plain-text one for vocabularies without chat tokens (GPT-2); system / user / assistant
  roles, and the mask that puts the finetuning loss on the assistant's tokens only
- a session that keeps one KV cache for the whole conversation: each turn prefills only its own tokens
  and the reply is generated one token at a time, streamed as it comes (temperature, top-k, top-p)
- /reset and /quit; end of input (Ctrl-D, a closed pipe) ends with exit 0; a conversation that outgrows
  the context drops its oldest turns, says so, and re-encodes what is left
"""

import codecs
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # so that `common` imports from any working directory

from common import load_module  # noqa: E402
from common.config import UserError  # noqa: E402

gpt_model = load_module(HERE / "model.py")
KVCache, top_k_filter, top_p_filter = gpt_model.KVCache, gpt_model.top_k_filter, gpt_model.top_p_filter

IM_START, IM_END = "<|im_start|>", "<|im_end|>"   # ChatML's two tokens, reserved in our tokenizer's specials


# ------------------------------------------------------------------------------------ chat templates
@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes one token sequence. For ChatML:

        <|im_start|>system\\nYou answer ...<|im_end|>\\n<|im_start|>user\\nWhat does `json.dumps` do?<|im_end|>\\n
        <|im_start|>assistant\\nSerialize obj to a JSON formatted str.<|im_end|>\\n

    = begin, then per message: header (with its role), content, stop, after_stop. The model learns the
    assistant's content and its stop token (mask 1); generation stops at `stop`. The roles' markers are
    special tokens (one id each, never produced by encoding a user's text), except in "plain".
    """
    name: str
    begin: str         # once, before the first message
    header: str        # before each message; "{role}" becomes the role
    stop: str          # ends each message: the token the assistant learns to end its turn with
    after_stop: str    # between the stop token and the next header

    def text(self, messages, add_generation_prompt=False):
        """The conversation as the string the template describes (what decode(render(...)) gives back)."""
        parts = [self.begin] + [self.header.format(role=m["role"]) + m["content"] + self.stop + self.after_stop
                                for m in messages]
        return "".join(parts) + (self.header.format(role="assistant") if add_generation_prompt else "")

    def parse(self, text):
        """The messages back from `text(messages)`: [{"role", "content"}, ...]."""
        before, after = self.header.split("{role}")
        pattern = re.escape(before) + r"(\w+)" + re.escape(after) + r"(.*?)" + re.escape(self.stop + self.after_stop)
        return [{"role": role, "content": content}
                for role, content in re.findall(pattern, text.removeprefix(self.begin), flags=re.DOTALL)]

    def render(self, tokenizer, messages, add_generation_prompt=False, begin=True):
        """(ids, assistant_mask): the conversation's token ids, and 1 where a token is the assistant's own
        (its content and its stop token), 0 elsewhere (roles, system, user, structure).

        The template's markers are encoded with their special tokens allowed; a message's content with
        none, so a user who types "<|im_end|>" cannot end a turn (ValueError instead, as tiktoken).
        >>> render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])  # doctest: +SKIP
        ([im_start, 'user', '\\n', 'hi', im_end, '\\n', im_start, 'assistant', '\\n', 'yo', im_end, '\\n'],
         [0,        0,      0,    0,    0,      0,    0,        0,           0,    1,    1,      0])
        """
        ids, mask = [], []

        def add(piece, learned, structure=True):
            if piece:
                new = tokenizer.encode(piece, allowed_special="all" if structure else ())
                ids.extend(new)
                mask.extend([int(learned)] * len(new))

        if begin:
            add(self.begin, False)
        for message in messages:
            assistant = message["role"] == "assistant"
            add(self.header.format(role=message["role"]), False)
            add(message["content"], assistant, structure=False)
            add(self.stop, assistant)
            add(self.after_stop, False)
        if add_generation_prompt:
            add(self.header.format(role="assistant"), False)
        return ids, mask


TEMPLATES = {
    "chatml": ChatTemplate("chatml", "", IM_START + "{role}\n", IM_END, "\n"),
    "llama3": ChatTemplate("llama3", "<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n",
                           "<|eot_id|>", ""),
}


def chat_template_for(tokenizer):
    """The template a vocabulary speaks: Llama 3's headers if it has them, ChatML if it has <|im_start|> and
    <|im_end|> (ours, Qwen, SmolLM2), else a plain-text one ("### user:") ending turns with end-of-text."""
    specials = tokenizer.special_tokens
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= set(specials):
        return TEMPLATES["llama3"]
    if {IM_START, IM_END} <= set(specials):
        return TEMPLATES["chatml"]
    end_of_text = tokenizer.decode([tokenizer.eot_id])
    return ChatTemplate("plain", "", "### {role}:\n", end_of_text, "\n\n")


# -------------------------------------------------------------------------------------- the session
class ChatSession:
    """One conversation with a model, its KV cache kept from turn to turn.

    `ids` are the tokens whose keys and values the cache holds, and `next_logits` the model's logits after
    the last of them; a turn feeds only its own tokens (header, message, the assistant's header) and then
    one token per generated token. When a turn would not fit in the context with room for a reply, the
    oldest turns are dropped and the rest is encoded again into a fresh cache (a cached key was computed
    at its position: the cache cannot just shift them).
    """

    def __init__(self, model, tokenizer, template, system="", max_new_tokens=128, temperature=0.8, top_k=0,
                 top_p=0.95, seed=0):
        self.model, self.tokenizer, self.template, self.system = model.eval(), tokenizer, template, system
        self.block_size = model.config.block_size
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        stop_ids = tokenizer.encode(template.stop, allowed_special="all")
        if len(stop_ids) != 1:
            raise UserError(f"the {template.name} template's stop {template.stop!r} is not one token of this vocabulary")
        self.stop_id = stop_ids[0]
        # what closes an assistant's turn in the cache, as the template writes it: stop + after_stop
        self.closing_ids = tokenizer.encode(template.stop + template.after_stop, allowed_special="all")
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.reset()

    def reset(self):
        """Forget the conversation: no messages, an empty cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = KVCache(self.model.config.n_layer, capacity=self.block_size)
        self.ids, self.next_logits = [], None

    @torch.no_grad()
    def feed(self, ids):
        """Run `ids` through the model on top of the cache (prefill): only these tokens are computed."""
        logits, _ = self.model(torch.tensor([ids], device=self.device), cache=self.cache)   # (1, T, V)
        self.ids += ids
        self.next_logits = logits[0, -1].float()                                            # (V,)

    def turn_ids(self, content):
        """The tokens a user turn adds to the cache: on a fresh cache the whole conversation so far
        (begin, system, earlier turns) first, then the user's message and the assistant's header."""
        message = [{"role": "user", "content": content}]
        if not self.ids:
            return self.template.render(self.tokenizer, self.messages + message, add_generation_prompt=True)[0]
        return self.template.render(self.tokenizer, message, add_generation_prompt=True, begin=False)[0]

    def fit(self, content):
        """Make room for a user turn and a reply: drop the oldest user/assistant turns (never the system
        prompt) until the turn, a reply of max_new_tokens (at most a quarter of the context) and the turn's
        closing tokens fit; returns how many turns were dropped."""
        reserve = min(self.max_new_tokens, self.block_size // 4) + len(self.closing_ids)
        dropped = 0
        while len(self.ids) + len(self.turn_ids(content)) + reserve > self.block_size:
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) <= first:           # nothing left to drop: the message alone is too long
                raise UserError(f"the message is {len(self.turn_ids(content))} tokens: it leaves no room for a "
                                f"reply in the context of {self.block_size}")
            del self.messages[first:first + 2]      # one user message and the assistant's reply
            dropped += 1
            self.cache = KVCache(self.model.config.n_layer, capacity=self.block_size)
            self.ids, self.next_logits = [], None   # re-encoded below, from the messages that are left
        return dropped

    def sample(self):
        """The next token from next_logits: greedy at temperature 0, else temperature, top-k, top-p."""
        logits = self.next_logits
        if self.temperature == 0:
            return int(logits.argmax())
        logits = logits[None] / self.temperature                                  # (1, V)
        if self.top_k:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p < 1:
            logits = top_p_filter(logits, self.top_p)
        return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=self.generator))

    def reply(self, content, stream=None):
        """Answer one user message: prefill its turn, generate until the stop token (or the token limit),
        writing the text to `stream` as it is generated; returns (reply text, turns dropped to fit)."""
        dropped = self.fit(content)
        self.feed(self.turn_ids(content))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a token may end mid-character
        new_ids = []
        for _ in range(min(self.max_new_tokens, self.block_size - len(self.ids) - len(self.closing_ids))):
            token = self.sample()
            if token == self.stop_id:
                break
            new_ids.append(token)
            piece = decoder.decode(self.tokenizer.decode_bytes([token]))
            if stream is not None and piece:
                stream.write(piece)
                stream.flush()
            self.feed([token])
        # The stop token was sampled but not fed: feed it (and after_stop) so that the cache holds the
        # turn as the template writes it and the next turn starts right after (a reply cut by the token
        # limit is closed the same way).
        self.feed(self.closing_ids)
        text = self.tokenizer.decode(new_ids)
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": text}]
        return text, dropped


def chat_loop(session, lines=None, out=None, err=None):
    """Read user messages line by line and answer each: /reset starts over, /quit (or the end of the
    input: Ctrl-D, a closed pipe) ends. Works the same over a pipe and at a terminal (which gets a
    prompt)."""
    lines = lines if lines is not None else sys.stdin
    out, err = out or sys.stdout, err or sys.stderr
    interactive = hasattr(lines, "isatty") and lines.isatty()
    out.write(f"chat ({session.template.name} template, context {session.block_size} tokens): "
              "/reset starts over, /quit or Ctrl-D ends\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        try:
            line = lines.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:                                  # end of input
            out.write("\n" if interactive else "")
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        try:
            dropped = session.fit(line)
            if dropped:
                out.write(f"(the conversation outgrew the context of {session.block_size} tokens: dropped the "
                          f"oldest {dropped} turn{'s' if dropped > 1 else ''})\n")
            out.write("assistant> ")
            out.flush()
            session.reply(line, stream=out)
        except (UserError, ValueError) as error:      # too long for the context, or a special token typed
            out.write("\n")
            err.write(f"error: {error}\n")
            continue
        except KeyboardInterrupt:                     # Ctrl-C stops this reply; the conversation goes on
            session.reset()
            out.write("\n(interrupted: conversation reset)\n")
            continue
        out.write("\n")
        out.flush()


if __name__ == "__main__":
    from common.config import run_main
    train = load_module(HERE / "train.py")
    run_main(train.main, ["--stage", "chat", *sys.argv[1:]])
