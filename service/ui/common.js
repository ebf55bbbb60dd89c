// Shared by the pages: the API key lives in sessionStorage (this tab only) and goes in the Authorization
// header; it is never put in a URL.
"use strict";

const KEY_NAME = "attrib-api-key";

class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_NAME);
}

function askForKey(onKey) {
  const form = document.getElementById("key-form");
  form.hidden = false;
  document.getElementById("key-input").focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_NAME, document.getElementById("key-input").value.trim());
    document.getElementById("key-input").value = "";
    form.hidden = true;
    onKey();
  };
}

function setUpKey(start) {
  document.getElementById("forget-key").onclick = () => {
    sessionStorage.removeItem(KEY_NAME);
    location.reload();
  };
  if (apiKey()) start();
  else askForKey(start);
}

const RETRIES = 4;  // a busy server (503) or a key over its rate (429) says when to come back: Retry-After

async function api(path, params) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params || {})) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) url.searchParams.append(name, String(item));
  }
  let response;
  for (let attempt = 0; ; attempt++) {
    response = await fetch(url, { headers: { Authorization: `Bearer ${apiKey()}` } });
    if (![429, 503].includes(response.status) || attempt >= RETRIES) break;
    const seconds = Math.min(Number(response.headers.get("Retry-After")) || 1, 10);
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401) sessionStorage.removeItem(KEY_NAME);
    throw new ApiProblem(response.status, body);
  }
  return body;
}

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function showMessage(text) {
  document.getElementById("message").textContent = text || "";
}

function showError(error, retry) {
  if (error instanceof ApiProblem && error.status === 401) {
    showMessage("That API key is not valid; enter another.");
    askForKey(retry);
    return;
  }
  showMessage(error.message);
}
