// Command server is an example MCP upstream on the Go SDK
// (github.com/modelcontextprotocol/go-sdk v1.8.0) for Ratatosk tests.
//
// It serves Streamable HTTP at /mcp with
// StreamableHTTPOptions{Stateless: true, PropagateRequestCancellation: true},
// speaking 2026-07-28 (per-request _meta, MRTR) and the 2025 eras on the same
// endpoint, plus plain HTTP GET /debug/headers and GET /debug/events.
//
//	server --port 9001 [--host 127.0.0.1]
//
// stdout: one line "READY go url=http://HOST:PORT/mcp pid=N" once listening.
// Logs: stderr. Exit code 2 if the address cannot be bound.
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

const (
	mcpPath         = "/mcp"
	seenMax         = 200
	eventsMax       = 500
	modernVersion   = "2026-07-28"
	stateTTL        = 10 * time.Minute
	defaultStateKey = "ratatosk-example-go-request-state"
)

// confirmSchema is sent verbatim as the elicitation's requestedSchema.
var confirmSchema = json.RawMessage(`{"type":"object","properties":{"confirmed":{"type":"boolean","title":"Confirmed"}},"required":["confirmed"]}`)

// ---------------------------------------------------------------------------
// Debug records

type record struct {
	mu      sync.Mutex
	headers []map[string]string
	events  []event
}

type event struct {
	Tag   string  `json:"tag"`
	Event string  `json:"event"`
	At    float64 `json:"at"`
}

var rec record

func (r *record) addHeaders(req *http.Request) {
	entry := map[string]string{"host": req.Host}
	for name, values := range req.Header {
		entry[strings.ToLower(name)] = strings.Join(values, ", ")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.headers = append(r.headers, entry)
	if len(r.headers) > seenMax {
		r.headers = append([]map[string]string(nil), r.headers[len(r.headers)-seenMax:]...)
	}
}

func (r *record) addEvent(tag, ev string) {
	now := float64(time.Now().UnixNano()) / 1e9
	r.mu.Lock()
	r.events = append(r.events, event{Tag: tag, Event: ev, At: now})
	if len(r.events) > eventsMax {
		r.events = append([]event(nil), r.events[len(r.events)-eventsMax:]...)
	}
	r.mu.Unlock()
	log.Printf("INFO sleep_then_return tag=%q %s", tag, ev)
}

func (r *record) snapshot() (any, any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h := append([]map[string]string{}, r.headers...)
	e := append([]event{}, r.events...)
	return h, e
}

// ---------------------------------------------------------------------------
// requestState: HMAC-signed, bound to the tool and its arguments, with a TTL.
// The key comes from RATATOSK_EXAMPLE_STATE_KEY (a fixed default otherwise), so
// replicas started with the same key accept each other's state.

var stateKey = func() []byte {
	if k := os.Getenv("RATATOSK_EXAMPLE_STATE_KEY"); k != "" {
		return []byte(k)
	}
	return []byte(defaultStateKey)
}()

type statePayload struct {
	Tool string `json:"tool"`
	Bind string `json:"bind"` // hash of the arguments the state belongs to
	Exp  int64  `json:"exp"`
}

func bindHash(args string) string {
	sum := sha256.Sum256([]byte(args))
	return base64.RawURLEncoding.EncodeToString(sum[:12])
}

func sealState(tool, args string) string {
	p, _ := json.Marshal(statePayload{Tool: tool, Bind: bindHash(args), Exp: time.Now().Add(stateTTL).Unix()})
	body := base64.RawURLEncoding.EncodeToString(p)
	mac := hmac.New(sha256.New, stateKey)
	mac.Write([]byte(body))
	return body + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

func checkState(state, tool, args string) bool {
	body, sig, ok := strings.Cut(state, ".")
	if !ok {
		return false
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, stateKey)
	mac.Write([]byte(body))
	if !hmac.Equal(got, mac.Sum(nil)) {
		return false
	}
	raw, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return false
	}
	var p statePayload
	if json.Unmarshal(raw, &p) != nil {
		return false
	}
	return p.Tool == tool && p.Bind == bindHash(args) && time.Now().Unix() <= p.Exp
}

func invalidStateError() error {
	return &jsonrpc.Error{
		Code:    jsonrpc.CodeInvalidParams,
		Message: "Invalid or expired requestState",
		Data:    json.RawMessage(`{"reason":"invalid_request_state"}`),
	}
}

func missingCapabilityError(capability string) error {
	return &jsonrpc.Error{
		Code:    mcp.CodeMissingRequiredClientCapabilities,
		Message: "Missing required client capability: " + capability,
		Data:    json.RawMessage(`{"requiredCapabilities":{"` + capability + `":{}}}`),
	}
}

// ---------------------------------------------------------------------------
// Tools

func textResult(s string) *mcp.CallToolResult {
	return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: s}}}
}

func errorResult(s string) *mcp.CallToolResult {
	r := textResult(s)
	r.IsError = true
	return r
}

func formatNumber(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }

// isModern reports whether the request being served uses 2026-07-28
// (per-request _meta). The SDK records the request's version as the
// ephemeral session's InitializeParams.
func isModern(req *mcp.CallToolRequest) bool {
	ip := req.Session.InitializeParams()
	return ip == nil || ip.ProtocolVersion >= modernVersion
}

func legacyBackChannelError(tool, method string, req *mcp.CallToolRequest) *mcp.CallToolResult {
	version := "unknown"
	if ip := req.Session.InitializeParams(); ip != nil {
		version = ip.ProtocolVersion
	}
	return errorResult(fmt.Sprintf(
		"%s: this stateless server cannot send the server->client %s request a %s (legacy) "+
			"client would have to answer; call it with protocol 2026-07-28, where it uses "+
			"multi round-trip requests (inputRequests)", tool, method, version))
}

type addIn struct {
	A float64 `json:"a"`
	B float64 `json:"b"`
}

type slowCountIn struct {
	N int `json:"n"`
}

type confirmIn struct {
	Question string `json:"question"`
}

type sleepIn struct {
	Seconds float64 `json:"seconds"`
	Tag     string  `json:"tag,omitempty"`
}

func add(_ context.Context, _ *mcp.CallToolRequest, in addIn) (*mcp.CallToolResult, any, error) {
	return textResult(formatNumber(in.A + in.B)), nil, nil
}

func slowCount(ctx context.Context, req *mcp.CallToolRequest, in slowCountIn) (*mcp.CallToolResult, any, error) {
	if in.N < 0 || in.N > 10000 {
		return nil, nil, errors.New("n must be between 0 and 10000")
	}
	token := req.Params.GetProgressToken()
	for i := 1; i <= in.N; i++ {
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if token != nil {
			if err := req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{
				ProgressToken: token, Progress: float64(i), Total: float64(in.N),
			}); err != nil {
				log.Printf("WARN slow_count: progress %d/%d not sent: %v", i, in.N, err)
			}
		}
	}
	return textResult(fmt.Sprintf("counted to %d", in.N)), nil, nil
}

func askRoots(_ context.Context, req *mcp.CallToolRequest, _ any) (*mcp.CallToolResult, any, error) {
	if !isModern(req) {
		return legacyBackChannelError("ask_roots", "roots/list", req), nil, nil
	}
	if caps := req.ClientCapabilities(); caps == nil || caps.RootsV2 == nil {
		return nil, nil, missingCapabilityError("roots")
	}
	const args = ""
	ask := func() *mcp.CallToolResult {
		return &mcp.CallToolResult{
			InputRequests: mcp.InputRequestMap{"roots": &mcp.ListRootsParams{}},
			RequestState:  sealState("ask_roots", args),
		}
	}
	p := req.Params
	if p.InputResponses == nil && p.RequestState == "" {
		return ask(), nil, nil // first round
	}
	if !checkState(p.RequestState, "ask_roots", args) {
		return nil, nil, invalidStateError()
	}
	res, ok := p.InputResponses["roots"].(*mcp.ListRootsResult)
	if !ok {
		return ask(), nil, nil // answer missing: ask again
	}
	uris := make([]string, 0, len(res.Roots))
	for _, r := range res.Roots {
		uris = append(uris, r.URI)
	}
	out, _ := json.Marshal(map[string][]string{"roots": uris})
	return textResult(string(out)), nil, nil
}

func confirm(_ context.Context, req *mcp.CallToolRequest, in confirmIn) (*mcp.CallToolResult, any, error) {
	if !isModern(req) {
		return legacyBackChannelError("confirm", "elicitation/create", req), nil, nil
	}
	if caps := req.ClientCapabilities(); caps == nil || caps.Elicitation == nil {
		return nil, nil, missingCapabilityError("elicitation")
	}
	ask := func() *mcp.CallToolResult {
		return &mcp.CallToolResult{
			InputRequests: mcp.InputRequestMap{"confirm": &mcp.ElicitParams{
				Mode:            "form",
				Message:         in.Question,
				RequestedSchema: confirmSchema,
			}},
			RequestState: sealState("confirm", in.Question),
		}
	}
	p := req.Params
	if p.InputResponses == nil && p.RequestState == "" {
		return ask(), nil, nil
	}
	if !checkState(p.RequestState, "confirm", in.Question) {
		return nil, nil, invalidStateError()
	}
	res, ok := p.InputResponses["confirm"].(*mcp.ElicitResult)
	if !ok {
		return ask(), nil, nil
	}
	var out []byte
	switch res.Action {
	case "accept":
		confirmed, ok := res.Content["confirmed"].(bool)
		if !ok {
			c, _ := json.Marshal(res.Content)
			return errorResult(fmt.Sprintf("confirm: accepted without a boolean 'confirmed' (content=%s)", c)), nil, nil
		}
		out, _ = json.Marshal(struct {
			Action    string `json:"action"`
			Confirmed bool   `json:"confirmed"`
		}{"accept", confirmed})
	case "decline", "cancel":
		out, _ = json.Marshal(struct {
			Action string `json:"action"`
		}{res.Action})
	default:
		return errorResult(fmt.Sprintf("confirm: unknown elicitation action %q", res.Action)), nil, nil
	}
	return textResult(string(out)), nil, nil
}

func sleepThenReturn(ctx context.Context, _ *mcp.CallToolRequest, in sleepIn) (*mcp.CallToolResult, any, error) {
	if in.Seconds < 0 || in.Seconds > 3600 {
		return nil, nil, errors.New("seconds must be between 0 and 3600")
	}
	rec.addEvent(in.Tag, "started")
	t := time.NewTimer(time.Duration(in.Seconds * float64(time.Second)))
	defer t.Stop()
	select {
	case <-ctx.Done():
		rec.addEvent(in.Tag, "cancelled")
		return nil, nil, ctx.Err()
	case <-t.C:
	}
	rec.addEvent(in.Tag, "finished")
	return textResult("slept " + formatNumber(in.Seconds)), nil, nil
}

func newServer(logger *slog.Logger) *mcp.Server {
	s := mcp.NewServer(&mcp.Implementation{Name: "ratatosk-example-go", Version: "0.0.0"}, &mcp.ServerOptions{Logger: logger})
	mcp.AddTool(s, &mcp.Tool{Name: "add", Description: "Return a + b."}, add)
	mcp.AddTool(s, &mcp.Tool{Name: "slow_count", Description: `Send n progress notifications about 100 ms apart, then return "counted to n".`}, slowCount)
	mcp.AddTool(s, &mcp.Tool{Name: "ask_roots", Description: `Ask the client for its roots; returns {"roots":[uri,...]} in the client's order.`}, askRoots)
	mcp.AddTool(s, &mcp.Tool{Name: "confirm", Description: "Ask the user a yes/no question (form elicitation)."}, confirm)
	mcp.AddTool(s, &mcp.Tool{Name: "sleep_then_return", Description: "Sleep for `seconds`, recording started/finished/cancelled events under `tag`."}, sleepThenReturn)
	return s
}

// ---------------------------------------------------------------------------
// HTTP

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func main() {
	port := flag.Int("port", 0, "TCP port to listen on (required)")
	host := flag.String("host", "127.0.0.1", "address to bind")
	flag.Parse()
	if *port <= 0 || *port > 65535 || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: server --port N [--host 127.0.0.1]")
		os.Exit(64)
	}

	log.SetOutput(os.Stderr)
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix(fmt.Sprintf("[go:%d] ", *port))
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("upstream", fmt.Sprintf("go:%d", *port))

	server := newServer(logger)
	mcpHandler := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server }, &mcp.StreamableHTTPOptions{
		Stateless:                    true,
		PropagateRequestCancellation: true,
		Logger:                       logger,
		// The gateway may forward the downstream Host header; the other
		// examples do not check it either.
		DisableLocalhostProtection: true,
	})

	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/headers", func(w http.ResponseWriter, _ *http.Request) {
		h, _ := rec.snapshot()
		writeJSON(w, h)
	})
	mux.HandleFunc("GET /debug/events", func(w http.ResponseWriter, _ *http.Request) {
		_, e := rec.snapshot()
		writeJSON(w, e)
	})
	mux.HandleFunc(mcpPath, func(w http.ResponseWriter, req *http.Request) {
		rec.addHeaders(req)
		mcpHandler.ServeHTTP(w, req)
	})

	addr := net.JoinHostPort(*host, strconv.Itoa(*port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Printf("ERROR cannot bind %s: %v", addr, err)
		os.Exit(2)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	go func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		sig := <-sigs
		log.Printf("INFO %v: shutting down", sig)
		_ = srv.Close()
	}()

	log.Printf("INFO listening on %s%s (stateless, 2026-07-28 + 2025 eras)", addr, mcpPath)
	fmt.Printf("READY go url=http://%s%s pid=%d\n", addr, mcpPath, os.Getpid())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Printf("ERROR serve: %v", err)
		os.Exit(1)
	}
}
