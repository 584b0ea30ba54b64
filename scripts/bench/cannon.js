// Load generator for scripts/bench/serve.py: autocannon, driven from code so that every
// response's latency is kept at full resolution (autocannon's own histogram rounds to
// whole milliseconds, too coarse for sub-millisecond answers).
//
//   node cannon.js '{"autocannon": PATH, "url": ..., "socketPath": null|PATH,
//                    "connections": 16, "duration": 20, "warmup": 3,
//                    "headers": {...}, "bodyFile": PATH}'
//
// Prints one JSON line: requests, rps, p50_ms, p99_ms, mean_ms, non2xx, warmup_requests,
// errors, timeouts.
'use strict'
const fs = require('fs')

const opts = JSON.parse(process.argv[2])
const autocannon = require(opts.autocannon)
const body = fs.readFileSync(opts.bodyFile)

function once (duration, keep) {
  const latencies = []
  let non2xx = 0
  let ok = 0
  const instance = autocannon({
    url: opts.url,
    socketPath: opts.socketPath || undefined,
    connections: opts.connections,
    duration,
    method: 'POST',
    headers: opts.headers,
    body
  })
  instance.on('response', (client, statusCode, bytes, ms) => {
    if (statusCode >= 200 && statusCode < 300) {
      ok++
      if (keep) latencies.push(ms)
    } else {
      non2xx++
    }
  })
  return instance.then((result) => ({ result, latencies, non2xx, ok }))
}

function percentile (sorted, p) {
  if (sorted.length === 0) return null
  const rank = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)
  return sorted[Math.max(0, rank)]
}

async function main () {
  const warm = opts.warmup > 0 ? await once(opts.warmup, false) : { ok: 0, non2xx: 0 }
  const { result, latencies, non2xx } = await once(opts.duration, true)
  latencies.sort((a, b) => a - b)
  const total = latencies.reduce((a, b) => a + b, 0)
  process.stdout.write(JSON.stringify({
    requests: latencies.length,
    seconds: result.duration,
    rps: latencies.length / result.duration,
    p50_ms: percentile(latencies, 50),
    p99_ms: percentile(latencies, 99),
    mean_ms: latencies.length ? total / latencies.length : null,
    non2xx,
    warmup_requests: warm.ok + warm.non2xx,
    errors: result.errors,
    timeouts: result.timeouts
  }) + '\n')
}

main().catch((err) => { console.error(err); process.exit(1) })
