"""Build ComfyUI workflows in the frontend's UI format from a short Python description, and convert UI-format
workflows back to the API format the server executes.

The shipped workflows (workflows/*.json) are generated from descriptions in scripts/make_workflows.py, so
their widget order always matches the nodes' current inputs; the benchmark and the tests run the very same
files after `ui_to_api`. Node definitions come from `node_defs()` (the host's INPUT_TYPES), the same data the
frontend reads from /object_info.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
NOTE_TYPES = {"Note", "MarkdownNote"}


@dataclass
class InputDef:
    name: str
    type: str  # "INT", "MODEL", ... ; "COMBO" for a list of choices
    options: dict

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")

    @property
    def has_control(self) -> bool:
        return self.type == "INT" and (self.options.get("control_after_generate") or self.name in SEED_NAMES)


@dataclass
class NodeDef:
    name: str
    inputs: list[InputDef]
    outputs: list[str]
    output_names: list[str]


def node_defs(names: set[str] | None = None) -> dict[str, NodeDef]:
    """Definitions of the host's node classes (needs ComfyUI imported: run inside the host)."""
    import nodes

    defs = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if names is not None and name not in names:
            continue
        spec = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for iname, v in spec.get(section, {}).items():
                typ, opts = (v[0], v[1] if len(v) > 1 else {}) if isinstance(v, (tuple, list)) else (v, {})
                if isinstance(typ, (list, tuple)):
                    typ = "COMBO"
                inputs.append(InputDef(iname, str(typ), dict(opts or {})))
        outs = [str(o) if not isinstance(o, (list, tuple)) else "COMBO" for o in cls.RETURN_TYPES]
        out_names = list(getattr(cls, "RETURN_NAMES", None) or outs)
        defs[name] = NodeDef(name, inputs, outs, out_names)
    return defs


@dataclass
class Ref:
    node: Node
    slot: int


@dataclass
class Node:
    id: int
    type: str
    values: dict[str, Any]
    title: str | None = None
    pos: tuple[float, float] | None = None
    size: tuple[float, float] | None = None

    def __getitem__(self, slot: int) -> Ref:
        return Ref(self, slot)


@dataclass
class Workflow:
    nodes: list[Node] = field(default_factory=list)

    def add(self, type_: str, title: str | None = None, **values: Any) -> Node:
        n = Node(len(self.nodes) + 1, type_, values, title)
        self.nodes.append(n)
        return n

    def note(self, text: str, pos: tuple[float, float] = (40, -260), size=(520, 220)) -> Node:
        n = self.add("Note", text=text)
        n.pos, n.size = pos, size
        return n

    # --- API format -----------------------------------------------------------------------------------------
    def to_api(self, defs: dict[str, NodeDef] | None = None) -> dict:
        """API prompt; with `defs`, widget inputs left out take their defaults (as the frontend sends them)."""
        out = {}
        for n in self.nodes:
            if n.type in NOTE_TYPES:
                continue
            values = dict(n.values)
            if defs is not None:
                for inp in defs[n.type].inputs:
                    if inp.is_widget and inp.name not in values:
                        values[inp.name] = inp.options.get("default")
            inputs = {k: ([str(v.node.id), v.slot] if isinstance(v, Ref) else v) for k, v in values.items()}
            out[str(n.id)] = {"class_type": n.type, "inputs": inputs}
            if n.title:
                out[str(n.id)]["_meta"] = {"title": n.title}
        return out

    # --- UI format ------------------------------------------------------------------------------------------
    def to_ui(self, defs: dict[str, NodeDef]) -> dict:
        depth = self._depths()
        col_y: dict[int, float] = {}
        links, ui_nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        for n in self.nodes:  # links first, so outputs can list them
            for k, v in n.values.items():
                if isinstance(v, Ref):
                    lid = len(links) + 1
                    d = defs[v.node.type]
                    links.append([lid, v.node.id, v.slot, n.id, k, d.outputs[v.slot]])
                    out_links.setdefault((v.node.id, v.slot), []).append(lid)
        for order, n in enumerate(self.nodes):
            if n.type in NOTE_TYPES:
                ui_nodes.append(self._ui_note(n, order))
                continue
            d = defs.get(n.type)
            if d is None:
                raise KeyError(f"node type {n.type!r} is not registered in the host; expected one of the loaded nodes")
            unknown = set(n.values) - {i.name for i in d.inputs}
            if unknown:
                raise KeyError(f"{n.type}: unknown inputs {sorted(unknown)}; expected some of {[i.name for i in d.inputs]}")
            inputs, widgets = [], []
            for inp in d.inputs:
                v = n.values.get(inp.name, inp.options.get("default"))
                if isinstance(v, Ref) or not inp.is_widget:
                    link = next((lk[0] for lk in links if lk[3] == n.id and lk[4] == inp.name), None)
                    entry = {"name": inp.name, "type": inp.type, "link": link}
                    if inp.is_widget:
                        entry["widget"] = {"name": inp.name}
                    if link is None and not inp.is_widget and inp.name not in n.values:
                        continue  # optional link input left empty
                    inputs.append(entry)
                if inp.is_widget:
                    widgets.append(None if isinstance(v, Ref) else v)
                    if inp.has_control:
                        widgets.append("fixed")
            outputs = [{"name": nm, "type": t, "links": out_links.get((n.id, i)) or None, "slot_index": i}
                       for i, (t, nm) in enumerate(zip(d.outputs, d.output_names))]
            col = depth[n.id]
            y = col_y.get(col, 0.0)
            h = n.size[1] if n.size else 60 + 26 * (len(inputs) + len(widgets) + len(outputs))
            col_y[col] = y + h + 40
            node = {"id": n.id, "type": n.type, "pos": list(n.pos or (40 + 380 * col, y)),
                    "size": list(n.size or (330, h)), "flags": {}, "order": order, "mode": 0,
                    "inputs": inputs, "outputs": outputs,
                    "properties": {"Node name for S&R": n.type}, "widgets_values": widgets}
            if n.title:
                node["title"] = n.title
            ui_nodes.append(node)
        for lk in links:  # UI links hold the target slot index, not the input name
            target = next(u for u in ui_nodes if u["id"] == lk[3])
            lk[4] = next(i for i, e in enumerate(target["inputs"]) if e["link"] == lk[0])
        return {"last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [60, 320]}}, "version": 0.4}

    def _ui_note(self, n: Node, order: int) -> dict:
        return {"id": n.id, "type": n.type, "pos": list(n.pos or (40, -260)), "size": list(n.size or (520, 220)),
                "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [n.values["text"]], "color": "#432", "bgcolor": "#653"}

    def _depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}
        for n in self.nodes:  # nodes are added after their inputs
            parents = [v.node.id for v in n.values.values() if isinstance(v, Ref)]
            depth[n.id] = 1 + max((depth[p] for p in parents), default=-1)
        return depth


def ui_to_api(workflow: dict, defs: dict[str, NodeDef]) -> dict:
    """The API-format prompt of a UI-format workflow (what the frontend's graphToPrompt sends)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) != 0:
            continue
        d = defs.get(node["type"])
        if d is None:
            raise KeyError(f"workflow node {node['id']} has type {node['type']!r}, which the host does not have "
                           "(a missing custom node pack?)")
        inputs: dict[str, Any] = {}
        linked = {e["name"]: e["link"] for e in node.get("inputs", []) if e.get("link") is not None}
        values = iter(node.get("widgets_values") or [])
        for inp in d.inputs:
            if inp.is_widget:
                v = next(values, None)
                if inp.has_control:
                    next(values, None)
                if inp.name not in linked:
                    inputs[inp.name] = v
            if inp.name in linked:
                lk = links[linked[inp.name]]
                inputs[inp.name] = [str(lk[1]), lk[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
