"""Nuclei polygons in and out: the formats QuPath (ASAP XML), DSA (annotation JSON) and GeoJSON clients use.

Readers turn an uploaded label into ``[(label name, [[x, y], ...]), ...]`` and refuse, with a 422 that
says which element is wrong, anything that is not a closed polygon of at least three distinct points.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

import numpy as np

from appcore.errors import unprocessable

Polygon = list[list[float]]
Shape = tuple[str, Polygon]

# ASAP/QuPath ROI types that enclose an area; "Line"/"Polyline" do not close, "Points"/"Dot" are clicks.
_ASAP_CLOSED = {"polygon", "rectangle", "ellipse", "spline", "area"}
_ASAP_OPEN = {"polyline", "line", "pointset"}


def _check_polygon(points: Any, where: str) -> Polygon:
    """Validate one ring: finite numbers, at least 3 distinct points, non-zero area; returned open."""
    try:
        pts = np.asarray([[float(p[0]), float(p[1])] for p in points], dtype=np.float64)
    except (TypeError, ValueError, IndexError, KeyError):
        raise unprocessable(f"{where}: points must be [x, y] number pairs") from None
    if pts.ndim != 2 or len(pts) == 0:
        raise unprocessable(f"{where}: no points")
    if not np.all(np.isfinite(pts)):
        raise unprocessable(f"{where}: coordinates must be finite numbers")
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(np.unique(pts, axis=0)) < 3:
        raise unprocessable(f"{where}: a polygon needs at least 3 distinct points, got {len(pts)}")
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    if area <= 0:
        raise unprocessable(f"{where}: the polygon encloses no area (its points are on one line)")
    return pts.tolist()


def parse_asap_xml(raw: bytes) -> list[Shape]:
    """Polygons of an ASAP XML document, as QuPath's MONAI Label extension submits it."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise unprocessable(f"The label is not well-formed XML ({e})") from None
    if root.tag != "ASAP_Annotations":
        raise unprocessable(f"XML labels must be ASAP annotations (root <ASAP_Annotations>), got <{root.tag}>")
    shapes: list[Shape] = []
    for k, ann in enumerate(root.iter("Annotation")):
        name = ann.get("PartOfGroup") or ann.get("Name") or ""
        if not name or name == "None":
            name = ann.get("Name") or ""
        kind = (ann.get("Type") or "Polygon").lower()
        where = f"Annotation {k} ({ann.get('Name')!r}, type {ann.get('Type')!r})"
        if kind in _ASAP_OPEN:
            raise unprocessable(f"{where} does not close: only closed shapes (Polygon, Rectangle, ...) are labels")
        if kind not in _ASAP_CLOSED:
            if kind in ("dot", "points"):
                continue  # click points, not outlines
            raise unprocessable(f"{where}: unknown type; use one of {sorted(_ASAP_CLOSED)}")
        coords = sorted(ann.iter("Coordinate"), key=lambda c: int(float(c.get("Order", 0))))
        points = [[c.get("X"), c.get("Y")] for c in coords]
        shapes.append((name, _check_polygon(points, where)))
    return shapes


def _dsa_elements(doc: Any) -> list[dict[str, Any]] | None:
    if isinstance(doc, list):
        return doc if all(isinstance(e, dict) and "type" in e for e in doc) else None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("annotation"), dict) and "elements" in doc["annotation"]:
        doc = doc["annotation"]
    elements = doc.get("elements")
    if isinstance(elements, list) and all(isinstance(e, dict) and "type" in e for e in elements):
        return elements
    return None


def _rectangle(e: dict[str, Any]) -> list[list[float]]:
    cx, cy = float(e["center"][0]), float(e["center"][1])
    w, h, r = float(e["width"]) / 2, float(e["height"]) / 2, float(e.get("rotation", 0.0))
    c, s = math.cos(r), math.sin(r)
    return [[cx + dx * c - dy * s, cy + dx * s + dy * c] for dx, dy in ((-w, -h), (w, -h), (w, h), (-w, h))]


def parse_dsa(doc: Any) -> list[Shape]:
    """Closed polylines and rectangles of a DSA (HistomicsUI) annotation document."""
    elements = _dsa_elements(doc)
    if elements is None:
        raise unprocessable("Not a DSA annotation document (expected 'elements' with typed shapes)")
    shapes: list[Shape] = []
    for k, e in enumerate(elements):
        kind = e.get("type")
        label = e.get("label")
        name = (label.get("value") if isinstance(label, dict) else label) or e.get("group") or ""
        where = f"element {k} ({kind})"
        if kind == "polyline":
            if not e.get("closed", False):
                raise unprocessable(f"{where} does not close ('closed' is not true); outline each nucleus fully")
            shapes.append((str(name), _check_polygon(e.get("points", []), where)))
        elif kind == "rectangle":
            try:
                shapes.append((str(name), _check_polygon(_rectangle(e), where)))
            except (KeyError, TypeError, ValueError, IndexError):
                raise unprocessable(f"{where}: needs 'center', 'width' and 'height'") from None
        elif kind == "point":
            continue
        else:
            raise unprocessable(f"{where}: unsupported element type; use closed 'polyline' or 'rectangle'")
    return shapes


def _geojson_polygons(geometry: Any, where: str) -> Iterable[list]:
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        yield geometry.get("coordinates", [[]])[0]
    elif kind == "MultiPolygon":
        for poly in geometry.get("coordinates", []):
            yield poly[0]
    elif kind in ("LineString", "MultiLineString"):
        raise unprocessable(f"{where} is a {kind}, which does not close; draw a Polygon")
    elif kind in ("Point", "MultiPoint"):
        return
    else:
        raise unprocessable(f"{where}: unsupported geometry {kind!r}; use Polygon or MultiPolygon")


def parse_geojson(doc: Any) -> list[Shape]:
    """Outer rings of the polygons of a GeoJSON Feature, FeatureCollection or geometry (QuPath export)."""
    features = doc.get("features") if doc.get("type") == "FeatureCollection" else [doc]
    shapes: list[Shape] = []
    for k, f in enumerate(features or []):
        geometry = f.get("geometry") if f.get("type") == "Feature" else f
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        name = (cls.get("name") if isinstance(cls, dict) else cls) or props.get("label") or props.get("name") or ""
        where = f"feature {k}"
        for ring in _geojson_polygons(geometry, where):
            if len(ring) < 4 or list(ring[0]) != list(ring[-1]):
                raise unprocessable(
                    f"{where}: the polygon ring does not close (GeoJSON rings end on their first point)"
                )
            shapes.append((str(name), _check_polygon(ring, where)))
    return shapes


def parse_monai(doc: dict[str, Any]) -> list[Shape]:
    """The ``annotation`` this server answers with (``elements`` of ``label`` + ``contours``)."""
    ann = doc.get("annotation", doc)
    shapes: list[Shape] = []
    for k, e in enumerate(ann.get("elements", [])):
        for j, contour in enumerate(e.get("contours", [])):
            shapes.append((str(e.get("label", "")), _check_polygon(contour, f"element {k} contour {j}")))
    return shapes


def parse_json(raw: bytes) -> list[Shape]:
    """Polygons of a JSON label: DSA annotation, GeoJSON, or this server's own infer answer."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unprocessable(f"The label is not valid JSON ({e})") from None
    if _dsa_elements(doc) is not None:
        return parse_dsa(doc)
    if isinstance(doc, dict) and doc.get("type") in ("FeatureCollection", "Feature", "Polygon", "MultiPolygon"):
        return parse_geojson(doc)
    if isinstance(doc, dict) and isinstance(doc.get("annotation", doc).get("elements"), list):
        return parse_monai(doc)
    raise unprocessable("Unknown JSON label: send a DSA annotation document, GeoJSON, or this server's annotation JSON")


def monai_annotation(polygons: Iterable[Polygon], label: str, color: tuple[int, int, int]) -> dict[str, Any]:
    """The per-region ``annotation`` MONAI Label's WSI writers (ASAP XML, DSA JSON) consume."""
    contours = [p for p in polygons]
    return {"labels": {label: list(color)}, "elements": [{"label": label, "contours": contours}] if contours else []}
