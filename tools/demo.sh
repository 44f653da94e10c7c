#!/usr/bin/env bash
# `make demo`: a shop from purchase history to a measured discount experiment, on this machine.
#
# Builds a small synthetic shop (or DATA=online-retail), trains and exports a model, migrates a
# fresh SQLite store, seeds segments, a tiered_topk rule and an experiment (control: no discount;
# treatment: the rule), starts discountd, calls it as a storefront would, replays simulated
# shoppers through the experiment, stops the server and prints the experiment report.
#
# Environment: DATA (empty: synthetic; online-retail), DEMO_DIR (var/demo), DEMO_PORT (50061),
# DEMO_SHOPPERS (3000), DEMO_USERS (2000), DEMO_ITEMS (300), DEMO_SEED (7), VENV (.venv).
set -euo pipefail

DATA=${DATA:-}
DIR=${DEMO_DIR:-var/demo}
PORT=${DEMO_PORT:-50061}
SHOPPERS=${DEMO_SHOPPERS:-3000}
USERS=${DEMO_USERS:-3000}
ITEMS=${DEMO_ITEMS:-300}
SEED=${DEMO_SEED:-7}
BIN=${VENV:-.venv}/bin
TARGET=127.0.0.1:$PORT
EXPERIMENT=demo-tiered-ab
export DISCOUNT_DB_URL="sqlite:///$DIR/discount.db"
export DISCOUNT_ACTOR=demo

SERVER_PID=
started=$SECONDS
step() { printf '\n==> [%3ds] %s\n' $((SECONDS - started)) "$*" >&2; }
ctl() { "$BIN/discountctl" "$@" >/dev/null; }

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local status=0
    wait "$SERVER_PID" || status=$?
    SERVER_PID=
    return "$status"
}

on_exit() {
    local status=$?
    if [ -n "$SERVER_PID" ]; then
        echo "stopping discountd (pid $SERVER_PID)" >&2
        stop_server || true
    fi
    if [ "$status" -ne 0 ]; then
        echo "demo failed (exit $status); discountd's log: $DIR/discountd.log" >&2
        [ -f "$DIR/discountd.log" ] && tail -n 5 "$DIR/discountd.log" >&2
    fi
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$DIR"
mkdir -p "$DIR"

case "$DATA" in
    "")
        step "1/9 a synthetic shop: $USERS users, $ITEMS items (seed $SEED)"
        "$BIN/discount-train" synth --out "$DIR/shop" --users "$USERS" --items "$ITEMS" \
            --seed "$SEED" >/dev/null
        step "2/9 train, evaluate on a time hold-out, export ONNX into $DIR/models"
        "$BIN/discount-train" fit --interactions "$DIR/shop/interactions.csv" \
            --items "$DIR/shop/items.csv" --out "$DIR/models" --factors 32 --epochs 15 \
            --regularization 10 --alpha 4 --seed "$SEED" >/dev/null
        USERS_FROM=$DIR/shop/interactions.csv
        ;;
    online-retail)
        step "1/9 the Online Retail dataset (../shared/datasets/online-retail)"
        step "2/9 train, evaluate on a time hold-out, export ONNX into $DIR/models"
        "$BIN/discount-train" fit --format online-retail --out "$DIR/models" --factors 64 \
            --epochs 15 --seed "$SEED" >/dev/null
        USERS_FROM=$DIR/models
        ;;
    *)
        echo "Error: DATA=$DATA is not known; use DATA= (synthetic) or DATA=online-retail" >&2
        exit 2
        ;;
esac
VERSION=$(cat "$DIR/models/CURRENT")

step "3/9 a fresh store: $DISCOUNT_DB_URL"
"$BIN/discountctl" db upgrade

step "4/9 segments (new, high value, lapsed), a tiered_topk rule, an experiment"
ctl segments create new-customers --where 'days_since_first_order < 30' --priority 10 \
    --description 'first order in the last 30 days'
ctl segments create high-value --where 'lifetime_value >= 400' --priority 20
ctl segments create lapsed --where 'days_since_last_order > 90' --priority 30
ctl rules create demo-tiered --policy tiered_topk --param k1=2 --param d1=15 --param d2=5 \
    --max-discount 20 --min-margin 10 --priority 10 \
    --description 'the 2 best recommendations 15% off, the rest 5%'
ctl experiments create "$EXPERIMENT" --variant control:50 --variant treatment:50:demo-tiered \
    --salt demo --description 'does a tiered discount on recommendations pay?'
ctl experiments start "$EXPERIMENT"
"$BIN/discountctl" segments list
"$BIN/discountctl" rules list

step "5/9 register and promote model version $VERSION; a client token for the storefront"
ctl models register "$DIR/models/$VERSION"
ctl models promote "$VERSION"
TOKEN=$("$BIN/discountctl" clients create demo-storefront --output json |
    "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["token"])')
export DISCOUNT_CLIENT_TOKEN=$TOKEN

step "6/9 start discountd on $TARGET (plaintext, public demo offer key, client auth required)"
"$BIN/discountd" --model-dir "$DIR/models" --host 127.0.0.1 --port "$PORT" --insecure \
    --insecure-demo-key --auth required --rules-poll-interval 1 >"$DIR/discountd.log" 2>&1 &
SERVER_PID=$!
echo "discountd pid $SERVER_PID, log $DIR/discountd.log" >&2

step "7/9 recommendations for known users and a new visitor, as a storefront asks for them"
"$BIN/python" -m tools.demo_client --target "$TARGET" --model-dir "$DIR/models" --wait 60

step "8/9 replay $SHOPPERS simulated shoppers: GetOffers, impressions, clicks, purchases"
"$BIN/discount-train" replay --target "$TARGET" --users-from "$USERS_FROM" \
    --shoppers "$SHOPPERS" --seed "$SEED"

step "9/9 stop discountd (SIGTERM flushes the offer log), then the experiment report"
stop_server
"$BIN/discountctl" experiments report "$EXPERIMENT" --plot "$DIR/report.png"
step "done: plot in $DIR/report.png; store $DISCOUNT_DB_URL; server log $DIR/discountd.log"
