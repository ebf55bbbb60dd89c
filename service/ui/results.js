// The results page: each query beside its top-k helpful and harmful training examples, with their inputs
// drawn as pictures (2-D / 3-D arrays), as text (when the API gives it) or as a compact table of values.
"use strict";

const MAX_PAGE_SIZE = 1000;
const MAX_EXAMPLE_IDS = 100;
const attributionId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const state = { attribution: null, nextToken: null, renders: 0 };

function filters() {
  return {
    queryId: document.getElementById("filter-query").value.trim(),
    direction: document.getElementById("filter-direction").value,
    count: Math.max(1, Math.min(100, Number(document.getElementById("filter-count").value) || 8)),
  };
}

// ------------------------------------------------------------------------------------------ drawing inputs

function imageLayout(shape) {
  if (shape.length === 2) return { height: shape[0], width: shape[1], channels: 1, channelsFirst: false };
  if (shape.length === 3 && [1, 3, 4].includes(shape[0])) {
    return { height: shape[1], width: shape[2], channels: shape[0], channelsFirst: true };
  }
  if (shape.length === 3 && [1, 3, 4].includes(shape[2])) {
    return { height: shape[0], width: shape[1], channels: shape[2], channelsFirst: false };
  }
  return null;
}

function drawImage(values, layout) {
  const flat = values.flat(Infinity);
  let low = Infinity, high = -Infinity;
  for (const value of flat) { low = Math.min(low, value); high = Math.max(high, value); }
  const scale = high > low ? 255 / (high - low) : 0;
  const { height, width, channels, channelsFirst } = layout;
  const canvas = element("canvas", { width: String(width), height: String(height) });
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const pixel = (y * width + x) * 4;
      for (let c = 0; c < 3; c++) {
        const channel = Math.min(c, channels - 1);
        const index = channelsFirst ? (channel * height + y) * width + x : (y * width + x) * channels + channel;
        // dark ink on white for one channel (digits, MNIST); true colours otherwise
        const level = (flat[index] - low) * scale;
        image.data[pixel + c] = channels === 1 ? 255 - level : level;
      }
      image.data[pixel + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

function valuesTable(values) {
  const flat = [values].flat(Infinity);
  const shown = flat.slice(0, 6).map((v) => element("td", { text: Number(v).toPrecision(3) }));
  if (flat.length > 6) shown.push(element("td", { text: `… ${flat.length} values` }));
  return element("table", { class: "values" }, element("tr", {}, ...shown));
}

function drawInput(example, shape) {
  if (typeof example.text === "string") return element("div", { class: "text-input", text: example.text });
  const layout = imageLayout(shape);
  return layout ? drawImage(example.input, layout) : valuesTable(example.input);
}

function targetText(target) {
  return Array.isArray(target) ? `target ${valuesTable(target).textContent}` : `label ${target}`;
}

// ------------------------------------------------------------------------------------------ fetching

async function fetchExamples(datasetId, ids) {
  const found = new Map();
  if (!datasetId || state.attribution.method.startsWith("meta_")) return { examples: found, shape: null };
  let shape = null;
  const unique = [...new Set(ids.map(String))];
  for (let start = 0; start < unique.length; start += MAX_EXAMPLE_IDS) {
    try {
      const page = await api(`/v1/datasets/${encodeURIComponent(datasetId)}/examples`,
                             { ids: unique.slice(start, start + MAX_EXAMPLE_IDS) });
      shape = page.input_shape;
      page.examples.forEach((example) => found.set(String(example.id), example));
    } catch (error) {
      showMessage(`Inputs of dataset ${datasetId} are not shown: ${error.message}`);
    }
  }
  return { examples: found, shape };
}

async function rowsOf(direction, params) {
  const page = await api(`/v1/attributions/${encodeURIComponent(attributionId)}/results`, { direction, ...params });
  return page;
}

function groupByQuery(rows) {
  const groups = new Map();
  for (const row of rows) {
    const key = row.query_id === null ? "" : String(row.query_id);
    if (!groups.has(key)) groups.set(key, { queryId: row.query_id, positive: [], negative: [] });
    groups.get(key)[row.direction].push(row);
  }
  return groups;
}

async function loadGroups(append) {
  const { queryId, direction, count } = filters();
  const attribution = state.attribution;
  const directions = direction === "both" ? ["positive", "negative"] : [direction];
  const pairwise = attribution.mode === "pairwise";
  if (!pairwise) {
    // aggregate and self: one ranking per direction, no query
    const rows = [];
    for (const d of directions) rows.push(...(await rowsOf(d, { page_size: count })).results);
    return { groups: groupByQuery(rows), nextToken: null };
  }
  const queriesPerPage = Math.max(1, Math.min(10, Math.floor(MAX_PAGE_SIZE / attribution.top_k)));
  const first = await rowsOf(directions[0], { query_id: queryId, page_size: attribution.top_k * queriesPerPage,
                                             page_token: append ? state.nextToken : null });
  const rows = first.results.filter((row) => row.rank <= count);
  if (directions.length === 2) {
    const queryIds = [...new Set(first.results.map((row) => row.query_id))];
    for (const id of queryIds) {
      const other = await rowsOf(directions[1], { query_id: id, page_size: count });
      rows.push(...other.results);
    }
  }
  return { groups: groupByQuery(rows), nextToken: first.next_page_token };
}

// ------------------------------------------------------------------------------------------ rendering

function exampleTile(row, example, shape) {
  const tile = element("div", { class: "example", "data-train-id": String(row.train_id) });
  if (example) tile.append(drawInput(example, shape));
  tile.append(element("span", { class: "train-id", text: `#${row.train_id}` }));
  if (row.task !== null && row.task !== undefined) tile.append(element("span", { text: `task ${row.task} · split ${row.split}` }));
  if (example) tile.append(element("span", { text: targetText(example.target) }));
  tile.append(element("span", { class: `score ${row.direction}`, text: row.score.toPrecision(3) }));
  return tile;
}

function querySide(direction, rows, trainExamples) {
  return element("div", { class: `side ${direction}` }, element("h3", { text: sideTitle(direction) }),
    element("div", { class: "strip" }, ...rows.map((row) =>
      exampleTile(row, trainExamples.examples.get(String(row.train_id)), trainExamples.shape))));
}

function sideTitle(direction) {
  if (state.attribution.mode === "self") {
    return direction === "positive" ? "Most unusual (highest self-influence: outliers, likely mislabels)"
                                    : "Least unusual (lowest self-influence)";
  }
  const margin = state.attribution.measurement === "margin";
  return direction === "positive"
    ? `Most helpful (positive: removing it would ${margin ? "lower the margin" : "raise the loss"})`
    : `Most harmful (negative: removing it would ${margin ? "raise the margin" : "lower the loss"})`;
}

function queryCard(group, trainExamples, queryExamples) {
  const mode = state.attribution.mode;
  const heading = group.queryId === null ? (mode === "self" ? "Self-influence" : "All queries (aggregate)")
                                         : `Query ${group.queryId}`;
  const head = element("div", { class: "query-cell" }, element("div", { class: "query-head", text: heading }));
  const query = group.queryId === null ? null : queryExamples.examples.get(String(group.queryId));
  if (query) head.append(drawInput(query, queryExamples.shape), element("div", { text: targetText(query.target) }));
  const sides = element("div", {});
  for (const direction of ["positive", "negative"]) {
    if (group[direction].length) sides.append(querySide(direction, group[direction], trainExamples));
  }
  return element("article", { class: "query", "data-query-id": group.queryId === null ? "" : String(group.queryId) },
                 head, sides);
}

async function render(append) {
  const generation = ++state.renders;  // a newer render (filters applied again) makes this one moot
  showMessage("Loading…");
  try {
    const { groups, nextToken } = await loadGroups(append);
    state.nextToken = nextToken;
    const list = [...groups.values()];
    const trainIds = list.flatMap((g) => [...g.positive, ...g.negative].map((row) => row.train_id));
    const trainExamples = await fetchExamples(state.attribution.train_dataset_id, trainIds);
    const queryExamples = await fetchExamples(state.attribution.query_dataset_id,
                                              list.map((g) => g.queryId).filter((id) => id !== null));
    if (generation !== state.renders) return;
    const container = document.getElementById("queries");
    if (!append) container.replaceChildren();
    list.forEach((group) => container.append(queryCard(group, trainExamples, queryExamples)));
    document.getElementById("more").hidden = !nextToken;
    if (document.getElementById("message").textContent === "Loading…") {
      showMessage(list.length ? "" : "No rows match these filters.");
    }
  } catch (error) {
    showError(error, () => render(false));
  }
}

function showSummary(attribution) {
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    element("h1", { text: `Attribution ${attribution.id}` }),
    element("p", { text: `${attribution.method} · ${attribution.mode} · ${attribution.measurement} · top ${attribution.top_k} · ` +
                         `train ${attribution.train_dataset_id}` +
                         (attribution.query_dataset_id ? ` · queries ${attribution.query_dataset_id}` : "") +
                         ` · job ${attribution.job_id}: ${attribution.status}` }),
    element("p", { class: "hint", text: attribution.mode === "self"
      ? "Scores: self-influence; higher = more unusual (outliers and likely mislabels first)."
      : "Scores: positive = the training example helps the query; negative = it hurts." }));
}

async function start() {
  try {
    const attribution = await api(`/v1/attributions/${encodeURIComponent(attributionId)}`);
    state.attribution = attribution;
    showSummary(attribution);
    if (["queued", "running"].includes(attribution.status)) {
      showMessage(`The job is ${attribution.status}; this page refreshes when it is done.`);
      setTimeout(start, 2000);
      return;
    }
    if (attribution.status !== "succeeded") {
      showMessage(`The job ${attribution.status}: no results.`);
      return;
    }
    document.getElementById("filters").hidden = false;
    document.getElementById("filter-count").value = String(Math.min(8, attribution.top_k));
    document.getElementById("filter-query").disabled = attribution.mode !== "pairwise";
    if (attribution.mode === "self") {
      const labels = { both: "most and least unusual", positive: "most unusual", negative: "least unusual" };
      for (const option of document.getElementById("filter-direction").options) option.text = labels[option.value];
    }
    await render(false);
  } catch (error) {
    showError(error, start);
  }
}

document.getElementById("filters").onsubmit = (event) => { event.preventDefault(); render(false); };
document.getElementById("more").onclick = () => render(true);
setUpKey(start);
