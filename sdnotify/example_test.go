package sdnotify_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/pgcache/pgcache/sdnotify"
)

// A service tells systemd it is ready, then pings the watchdog while its
// health check passes. Here a socket of our own plays systemd's part.
func Example() {
	dir, _ := os.MkdirTemp("", "sdnotify")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "notify")
	systemd, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer systemd.Close()

	// In a service: n, err := sdnotify.FromEnv()
	n, err := sdnotify.New(sdnotify.Config{Socket: path, WatchdogInterval: 20 * time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	_ = n.Ready()
	_ = n.Status("serving on 127.0.0.1:11311")
	fmt.Println("ping every", n.WatchdogPeriod())

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = n.RunWatchdog(ctx, func(context.Context) error { return nil }) // first ping at once
	}()

	buf := make([]byte, 512)
	for range 3 {
		k, _ := systemd.Read(buf)
		fmt.Printf("%q\n", buf[:k])
	}
	cancel()
	<-done
	_ = n.Stopping()
	k, _ := systemd.Read(buf)
	fmt.Printf("%q\n", buf[:k])
	// Output:
	// ping every 10s
	// "READY=1\n"
	// "STATUS=serving on 127.0.0.1:11311\n"
	// "WATCHDOG=1\n"
	// "STOPPING=1\n"
}
