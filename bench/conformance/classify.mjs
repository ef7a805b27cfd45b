// Classify cache-tests results the way cache-tests.fyi shows them.
//
// The raw JSON from the suite's CLI only says `true` or [errorName, message] per test id.
// Whether a failure matters depends on the test's `kind` (required / optimal / check) and
// on its `depends_on` tests, which live in the suite's own test modules. This script loads
// those modules from the installed suite (never from this repository) and applies the
// suite's own determineTestResult(), so our counts match the public result tables.
//
// usage: node classify.mjs SUITE_DIR NAME=RESULTS.json [NAME=RESULTS.json ...] > out.json

import path from 'path'
import fs from 'fs'
import { pathToFileURL } from 'url'

const OUTCOMES = {
  '-': 'untested',
  '✅': 'pass',
  '⛔️': 'fail',
  '⚠️': 'optional_fail',
  Y: 'yes',
  N: 'no',
  '🔹': 'setup_fail',
  '⁉️': 'harness_fail',
  '⚪️': 'dependency_fail',
  '↻': 'retry'
}

async function loadSuite (suiteDir) {
  const load = rel => import(pathToFileURL(path.join(suiteDir, rel)).href)
  const tests = (await load('tests/index.mjs')).default
  const surrogate = (await load('tests/surrogate-control.mjs')).default
  if (!tests.includes(surrogate)) tests.push(surrogate) // the CLI runs it too
  const display = await load('lib/display.mjs')
  return { tests, determine: display.determineTestResult }
}

function describe (suites, determine, runs) {
  const rows = []
  for (const suite of suites) {
    for (const test of suite.tests) {
      if (test.browser_only === true) continue
      const results = {}
      for (const [name, raw] of Object.entries(runs)) {
        const symbol = determine(suites, test.id, raw)[2]
        const value = raw[test.id]
        results[name] = {
          outcome: OUTCOMES[symbol] || symbol,
          raw_pass: value === true,
          detail: Array.isArray(value) ? value[1] : null
        }
      }
      rows.push({
        id: test.id,
        suite: suite.id,
        suite_name: suite.name,
        name: test.name,
        kind: test.kind || 'required',
        depends_on: test.depends_on || [],
        results
      })
    }
  }
  return rows
}

async function main () {
  const [suiteDir, ...pairs] = process.argv.slice(2)
  if (!suiteDir || pairs.length === 0) {
    console.error('usage: node classify.mjs SUITE_DIR NAME=RESULTS.json ...')
    process.exit(2)
  }
  const runs = {}
  for (const pair of pairs) {
    const at = pair.indexOf('=')
    runs[pair.slice(0, at)] = JSON.parse(fs.readFileSync(pair.slice(at + 1), 'utf8'))
  }
  const { tests, determine } = await loadSuite(path.resolve(suiteDir))
  console.log(JSON.stringify(describe(tests, determine, runs), null, 1))
}

main().catch(err => {
  console.error(err)
  process.exit(1)
})
