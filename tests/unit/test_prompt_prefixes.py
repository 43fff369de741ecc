from core.inference import ChatMessage, ChatRole, FunctionTool, ToolCall, ToolUse
from core.prompt_prefixes import longest_cached_prefix, prefix_fingerprints

SYSTEM = ChatMessage(ChatRole.SYSTEM, "You are terse.")
ASK = ChatMessage(ChatRole.USER, "Name a colour.")
REPLY = ChatMessage(ChatRole.ASSISTANT, "Blue.")
FOLLOW_UP = ChatMessage(ChatRole.USER, "Another?")


def test_a_follow_up_turn_shares_the_fingerprints_of_the_turn_before() -> None:
    first = prefix_fingerprints("m", None, (SYSTEM, ASK, REPLY))
    second = prefix_fingerprints("m", None, (SYSTEM, ASK, REPLY, FOLLOW_UP))
    assert len(first) == 3
    assert len(second) == 4
    assert second[:3] == first
    assert longest_cached_prefix(second, first) == 3


def test_model_tools_and_every_message_field_change_the_fingerprint() -> None:
    base = prefix_fingerprints("m", None, (ASK,))
    tools = ToolUse(tools=(FunctionTool("f"),))
    variants = [
        prefix_fingerprints("other", None, (ASK,)),
        prefix_fingerprints("m", tools, (ASK,)),
        prefix_fingerprints("m", None, (ChatMessage(ChatRole.SYSTEM, ASK.content),)),
        prefix_fingerprints("m", None, (ChatMessage(ChatRole.USER, ASK.content, name="x"),)),
        prefix_fingerprints(
            "m",
            None,
            (ChatMessage(ChatRole.ASSISTANT, "", tool_calls=(ToolCall("c", "f", "{}"),)),),
        ),
    ]
    assert all(variant != base for variant in variants)
    assert len({v[0] for v in variants}) == len(variants)


def test_fields_are_delimited_so_shifted_text_differs() -> None:
    one = prefix_fingerprints("m", None, (ChatMessage(ChatRole.USER, "ab"),))
    two = prefix_fingerprints("m", None, (ChatMessage(ChatRole.USER, "a", name="b"),))
    assert one != two


def test_fingerprints_fit_an_unsigned_64_bit_field_and_nothing_cached_matches_nothing() -> None:
    prints = prefix_fingerprints("m", None, (SYSTEM, ASK))
    assert all(0 <= value < 2**64 for value in prints)
    assert longest_cached_prefix(prints, ()) == 0
    assert longest_cached_prefix((), prints) == 0
