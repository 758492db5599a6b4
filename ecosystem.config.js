// PM2: `pm2 start ecosystem.config.js`, then `pm2 save` and `pm2 startup` to survive reboots.
const path = require("path");

module.exports = {
  apps: [
    {
      name: "poller",
      // The console script inside the project's virtual environment (not a global Python);
      // POLLER_BIN points elsewhere when the environment lives somewhere else.
      script: process.env.POLLER_BIN || path.join(__dirname, ".venv", "bin", "poller"),
      args: "run",
      // Not a Node.js program: PM2 must run the script as it is, with no interpreter in front.
      interpreter: "none",
      // poller reads .env from its working directory.
      cwd: __dirname,
      // One process is enough; more are safe (claims are atomic) if you want a hot spare.
      instances: 1,
      exec_mode: "fork",
      autorestart: true,
      // Exit 2 is a configuration error: restarting cannot fix it, so PM2 leaves it stopped.
      stop_exit_codes: [2],
      // Restart after a crash with a growing delay (100 ms doubling, up to 15 s), so a MongoDB
      // outage at start-up is not a tight restart loop.
      exp_backoff_restart_delay: 100,
      // PM2 stops with SIGINT and kills after kill_timeout: keep it above one send
      // (WAHA_TIMEOUT_SECONDS, 30 s by default, plus the writes around it), or the message in
      // flight is cut off and ends `unknown`.
      kill_timeout: 45000,
      // Logs go where PM2 users look: `pm2 logs poller`, ~/.pm2/logs/poller-{out,error}.log
      // (poller writes to stderr, so its lines are in poller-error.log).
      merge_logs: true,
      env: {
        // Lines reach the log file as they are written, not when a buffer fills.
        PYTHONUNBUFFERED: "1",
      },
    },
  ],
};
