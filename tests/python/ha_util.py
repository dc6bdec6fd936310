"""Home Assistant's requests, as its Ollama integration (2025.4) makes them: the Assist
system prompt (time line, instructions, the exposed entities), the Assist tools
(intent schemas turned into JSON schemas by voluptuous-openapi), and the settings it
sends once its options dialog has been saved (`num_ctx` as a float, `keep_alive` as
"-1.0s").
"""

from __future__ import annotations

import json
import random
from typing import Any

DEVICE_CLASSES = [
    "water",
    "gas",
    "power",
    "switch",
    "outlet",
    "tv",
    "speaker",
    "receiver",
    "awning",
    "blind",
    "curtain",
    "damper",
    "door",
    "garage",
    "gate",
    "shade",
    "shutter",
    "window",
]
_TARGET = {
    "name": {"type": "string"},
    "area": {"type": "string"},
    "floor": {"type": "string"},
    "domain": {"type": "array", "items": {"type": "string"}},
}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on/opens/presses a device or entity. For locks, this performs a 'lock' action.",
            "parameters": {
                "type": "object",
                "properties": {
                    **_TARGET,
                    "device_class": {"type": "array", "items": {"type": "string", "enum": DEVICE_CLASSES}},
                },
                "required": [],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "HassTurnOff",
            "description": "Turns off/closes a device or entity. For locks, this performs an 'unlock' action.",
            "parameters": {
                "type": "object",
                "properties": {
                    **_TARGET,
                    "device_class": {"type": "array", "items": {"type": "string", "enum": DEVICE_CLASSES}},
                },
                "required": [],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "HassLightSet",
            "description": "Sets the brightness percentage or color of a light",
            "parameters": {
                "type": "object",
                "properties": {
                    **_TARGET,
                    "color": {"type": "string"},
                    "temperature": {"type": "integer"},
                    "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                },
                "required": [],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "GetLiveContext",
            "description": "Provides real-time information about the CURRENT state, value, or mode of devices, "
            "sensors, entities, or areas.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]

_AREAS = ["Kitchen", "Living Room", "Bedroom", "Office", "Hallway", "Garage", "Bathroom", "Garden"]
_KINDS = [
    ("light", "Light", ["on", "off"]),
    ("switch", "Plug", ["on", "off"]),
    ("cover", "Blind", ["open", "closed"]),
    ("sensor", "Temperature", ["21.5", "19.0"]),
    ("lock", "Door Lock", ["locked", "unlocked"]),
    ("climate", "Thermostat", ["heat", "off"]),
    ("media_player", "Speaker", ["playing", "idle"]),
]


def entities(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        domain, kind, states = _KINDS[i % len(_KINDS)]
        area = _AREAS[(i // len(_KINDS)) % len(_AREAS)]
        out.append(
            {
                "names": f"{area} {kind}" + (f" {i // 56 + 1}" if i >= 56 else ""),
                "domain": domain,
                "state": rng.choice(states),
                "areas": area,
            }
        )
    return out


def system_prompt(time: str = "10:36:44", date: str = "2026-12-06", n_entities: int = 12, seed: int = 0) -> str:
    """The Assist prompt: the time line first, then instructions and the entities."""
    lines = [
        f"Current time is {time}. Today's date is {date}.",
        "You are a voice assistant for Home Assistant.",
        "Answer questions about the world truthfully.",
        "Answer in plain text. Keep it simple and to the point.",
        "When controlling Home Assistant always call the intent tools. Use HassTurnOn to lock and HassTurnOff to "
        "unlock a lock. When controlling a device, prefer passing just name and domain. When controlling an area, "
        "prefer passing just area name and domain.",
        "When a user asks to turn on all devices of a specific type, ask user to specify an area, unless there is "
        "only one device of that type.",
        "This device is not able to start timers.",
        "An overview of the areas and the devices in this smart home:",
    ]
    for e in entities(n_entities, seed):
        lines += [
            f"- names: {e['names']}",
            f"  domain: {e['domain']}",
            f"  state: '{e['state']}'",
            f"  areas: {e['areas']}",
        ]
    return "\n".join(lines)


def tool_result(name: str, arguments: dict[str, Any]) -> str:
    """What HA puts in the `tool` message after running an intent."""
    target = arguments.get("name") or arguments.get("area") or "the device"
    return json.dumps(
        {
            "speech": {},
            "response_type": "action_done",
            "data": {
                "targets": [],
                "success": [{"name": target, "type": "entity", "id": "light.kitchen"}],
                "failed": [],
            },
        }
    )


# The options and keep_alive HA sends once its settings dialog has been saved.
SAVED_OPTIONS = {"num_ctx": 8192.0}
SAVED_KEEP_ALIVE = "-1.0s"
