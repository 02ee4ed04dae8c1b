"""DLN's prompt templates, ported from microsoft/deep-language-networks@036d895 (dln/templates/*.yaml).

The Jinja templates are written out here as Python functions that produce the same text (Jinja's
whitespace handling included where it shapes the output), so no template engine is needed:
    classify_forward v3.0     -> scoring.forward_context: "{prompt}\\n\\n{input}\\n\\nAnswer:"
    q_action_prompt v3.5      -> backward(): the prompt-proposal ("backward") template, its four
                                 rewrite instructions in MESSAGES, stop strings STOP
    suffix_forward_tbs v1.0   -> hidden_forward(): DLN-2's hidden layer, "{input}\\n\\n{prompt} Let's think step by step."
    classify_residual v1.0    -> residual(): the output layer's input in DLN-2
    suffix_backward_h_np_y    -> hidden_backward(): DLN-2's posterior proposals for the hidden text

Original notice (the templates are from this code):

    MIT License

    Copyright (c) Microsoft Corporation.

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

STOP = ("\n\n", "[END]", "#")                       # q_action_prompt's stop_tokens

MESSAGES = (                                        # q_action_prompt v3.5 message_alternatives
    "Clarify the instruction by adding few words or a short sentence. Be concise.",
    "Improve the instruction by providing examples on how to solve the task. Be concise.",
    "Shorten the instruction by removing superflous words or sentences.",
    "Rewrite the instruction by providing detailed information to avoid ambiguity. Be concise.",
)

HIDDEN_MESSAGES = (                                 # suffix_backward_h_np_y message_alternatives
    "Reflect and refine your thoughts for this problem by adding detailed explanations.",
    "Fix the errors in your reasoning. Add examples to illustrate your thoughts. Be concise.",
    "Improve your thoughts to make them clearer and more concise.",
)


@dataclass
class Info:
    """One example shown to the backward template: input, the student's output, the target, the loss."""
    input: str
    output: str
    target: str
    loss: float


def backward(prompt: str, infos: Sequence[Info], message: str) -> str:
    """q_action_prompt v3.5: successes (loss 0) then errors, ending in "## Instruction\\n>"."""
    parts = ["A student is completing a task that requires producing a text output from a text input. "
             "The student receives an instruction that describes how to produce the output given each input.",
             "The student has made some errors. Your task is to improve the instruction such that the student "
             "can fix the errors.", "",
             "This was the instruction.", "## Instruction", f"> {prompt}", "[END]", "",
             "# Student successes"]
    for i in infos:
        if i.loss == 0.0:
            parts += [" ", "## Input:", f"> {i.input}", "## Correct Output:", f"> {i.target}"]
    parts += [" ", "", "# Student errors"]
    for i in infos:
        if i.loss > 0.0:
            parts += [" ", "## Input:", f"> {i.input}", "## Student Output:", f"> {i.output}",
                      "## Correct Output:", f"> {i.target}"]
    parts += [" ", "", f"Improve the instruction to fix the student errors. {message}", "## Instruction", ">"]
    return "\n".join(parts).strip()


def hidden_forward(prompt: str, inp: str) -> str:
    """suffix_forward_tbs v1.0: the hidden layer's context (the model continues with its thoughts)."""
    return f"{inp}\n\n{prompt} Let's think step by step."


def residual(inp: str, hidden: str) -> str:
    """classify_residual v1.0: the output layer's input in DLN-2."""
    return f"{inp}\nYour thoughts were:\n{hidden}"


def hidden_backward(next_prompt: str, inp: str, h: str, y: str, message: str) -> str:
    """suffix_backward_h_np_y v1.0: propose better thoughts h for input x given the answer y."""
    return (f"This is useful context to solve the problem:\n{next_prompt}\n\nThis is the input:\n{inp}\n\n"
            f"These were your thoughts about the input:\n{h}\n\nGiven that this is the correct answer:\n{y}\n\n"
            f"{message}\nThoughts:")


def cut_at_stop(text: str, stop: Sequence[str] = STOP) -> str:
    """The text before the first stop string (a proposer's output is cut there), stripped."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            end = min(end, i)
    return text[:end].strip()
