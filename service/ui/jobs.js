// The jobs page: the tenant's jobs, newest first, each attribution linked to its results page.
"use strict";

let nextToken = null;

function jobRow(job) {
  const progress = job.progress.total ? `${job.progress.stage} ${job.progress.completed}/${job.progress.total}`
                                      : job.progress.stage;
  const result = element("td");
  if (job.attribution_id) {
    result.append(element("a", { href: `/ui/attributions/${encodeURIComponent(job.attribution_id)}`,
                                 text: job.status === "succeeded" ? "results" : "attribution" }));
  } else if (job.error) {
    result.textContent = job.error.detail || "";
  }
  return element("tr", { "data-job-id": job.id },
    element("td", { text: job.id }), element("td", { text: job.kind }), element("td", { text: job.status }),
    element("td", { text: progress }), element("td", { text: new Date(job.created_at).toLocaleString() }), result);
}

async function loadJobs(append) {
  try {
    const page = await api("/v1/jobs", { page_size: 50, page_token: append ? nextToken : null });
    const body = document.querySelector("#jobs tbody");
    if (!append) body.replaceChildren();
    page.jobs.forEach((job) => body.append(jobRow(job)));
    document.getElementById("jobs").hidden = false;
    nextToken = page.next_page_token;
    document.getElementById("more").hidden = !nextToken;
    showMessage(page.jobs.length || append ? "" : "No jobs yet.");
    const busy = page.jobs.some((job) => job.status === "queued" || job.status === "running");
    if (busy && !append) setTimeout(() => loadJobs(false), 3000);
  } catch (error) {
    showError(error, () => loadJobs(false));
  }
}

document.getElementById("more").onclick = () => loadJobs(true);
setUpKey(() => loadJobs(false));
