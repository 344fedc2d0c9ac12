"""Write batchgen/data/prompts.parquet: the demo job's 64 chat prompts (deterministic, no randomness).

Columns: id (string), topic (string), messages (list of {role, content}; a few rows open with a system
message). Four row groups of 16 rows, so the demo job's planning has row groups to cut on.

Rerun with:  .venv/bin/python batchgen/data/make_prompts.py
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 16

PROMPTS: list[tuple[str, str]] = [
    ("poetry", "Write a short poem about the ocean."),
    ("poetry", "Write a haiku about autumn leaves."),
    ("poetry", "Write four lines of verse about a lighthouse keeper."),
    ("poetry", "Compose a limerick about a cat who loves to cook."),
    ("poetry", "Write a two-line rhyme about morning coffee."),
    ("poetry", "Write a short poem about city lights at night."),
    ("poetry", "Write a haiku about a mountain stream."),
    ("poetry", "Write a short poem for a friend's birthday."),
    ("science", "Why is the sky blue?"),
    ("science", "Explain photosynthesis in two sentences."),
    ("science", "What causes the seasons on Earth?"),
    ("science", "How do vaccines help the immune system?"),
    ("science", "What is the difference between weather and climate?"),
    ("science", "Explain what a black hole is to a ten-year-old."),
    ("science", "Why does ice float on water?"),
    ("science", "What is DNA made of?"),
    ("cooking", "Give me a simple recipe for pancakes."),
    ("cooking", "How do I cook rice on the stove?"),
    ("cooking", "What can I make with eggs, spinach and cheese?"),
    ("cooking", "How long should I boil an egg for a soft yolk?"),
    ("cooking", "Suggest a quick vegetarian dinner idea."),
    ("cooking", "What is the difference between baking soda and baking powder?"),
    ("cooking", "How do I make a basic tomato sauce?"),
    ("cooking", "Give me three tips for making crispy roast potatoes."),
    ("travel", "What should I pack for a weekend hiking trip?"),
    ("travel", "Suggest three things to do in Paris on a rainy day."),
    ("travel", "How can I avoid jet lag on a long flight?"),
    ("travel", "What is a good way to learn basic phrases before visiting a new country?"),
    ("travel", "Give me a packing list for a beach holiday."),
    ("travel", "What are the benefits of travelling by train?"),
    ("travel", "How do I plan a budget road trip?"),
    ("travel", "Name three famous landmarks in Italy."),
    ("coding", "Write a Python function that reverses a string."),
    ("coding", "What is the difference between a list and a tuple in Python?"),
    ("coding", "Explain recursion with a simple example."),
    ("coding", "How do I read a file line by line in Python?"),
    ("coding", "What does a SQL JOIN do?"),
    ("coding", "Write a function that checks whether a number is prime."),
    ("coding", "What is version control and why is it useful?"),
    ("coding", "Explain what an API is in one paragraph."),
    ("advice", "How can I get better sleep?"),
    ("advice", "Give me three tips for staying focused while studying."),
    ("advice", "How do I start a daily exercise habit?"),
    ("advice", "What are good ways to manage stress at work?"),
    ("advice", "How can I become a better listener?"),
    ("advice", "Suggest a morning routine for a productive day."),
    ("advice", "How do I prepare for a job interview?"),
    ("advice", "What is a simple way to start saving money?"),
    ("facts", "What is the capital of Australia?"),
    ("facts", "How many planets are in the solar system?"),
    ("facts", "Who wrote Romeo and Juliet?"),
    ("facts", "What is the largest ocean on Earth?"),
    ("facts", "What is the boiling point of water at sea level in Celsius?"),
    ("facts", "Which animal is known as the king of the jungle?"),
    ("facts", "What language is spoken in Brazil?"),
    ("facts", "How many continents are there?"),
    ("stories", "Tell a very short story about a robot who learns to paint."),
    ("stories", "Write the opening sentence of a mystery novel."),
    ("stories", "Tell a short bedtime story about a brave little turtle."),
    ("stories", "Describe a dragon in three sentences."),
    ("stories", "Write a short fable with a moral about patience."),
    ("stories", "Tell a two-sentence story about a lost key."),
    ("stories", "Write a short dialogue between the sun and the moon."),
    ("stories", "Describe a magical forest in a few sentences."),
]

# Rows that open with a system message, so the demo exercises more of the chat template.
SYSTEM_PROMPTS = {
    3: "You are a playful poet.",
    13: "You explain science simply and briefly.",
    36: "You are a patient programming teacher.",
    50: "Answer in one short sentence.",
}


def build_table() -> pa.Table:
    """The demo prompt table."""
    messages = []
    for index, (_, prompt) in enumerate(PROMPTS):
        conversation = []
        if index in SYSTEM_PROMPTS:
            conversation.append({"role": "system", "content": SYSTEM_PROMPTS[index]})
        conversation.append({"role": "user", "content": prompt})
        messages.append(conversation)
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.table(
        {
            "id": pa.array([f"demo-{i:03d}" for i in range(len(PROMPTS))], pa.string()),
            "topic": pa.array([topic for topic, _ in PROMPTS], pa.string()),
            "messages": pa.array(messages, message_type),
        }
    )


def main() -> None:
    path = Path(__file__).parent / "prompts.parquet"
    pq.write_table(build_table(), path, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    print(f"wrote {path} ({len(PROMPTS)} rows)")


if __name__ == "__main__":
    main()
